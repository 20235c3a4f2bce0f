import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

from logs import compare_grids as grids_module
from logs import compare_optimizers as compare
from logs import compare_report as report


def config(*argv, data_dir=os.path.join(REPO, "tests")):
    """The protocol's config from a command line, without checking that the data exists."""
    cfg = compare.parse_args(compare.DEFAULTS, list(argv))
    base = compare.DEFAULTS | compare.PRESETS[cfg["preset"]] | (compare.DRY_RUN if cfg["dry_run"] else {})
    return compare.parse_args(base, list(argv)) | {"data_dir": data_dir}


def train_config(command):
    """What train.py would run with: its config parsed from the command line the protocol built."""
    import train
    from opengpt.run_setup import check_config

    assert command[1] == os.path.join(REPO, "train.py")
    cfg = compare.parse_args(train.DEFAULTS, command[2:])
    check_config(cfg)
    return cfg


def test_method_names_are_the_labels_the_registry_gives_their_runs():
    """The table's rows, the plot's lines and logs/plot_loss.py's groups name a run the same way."""
    import train
    from opengpt.optimizers import REGISTRY

    for method, spec in compare.METHODS.items():
        cfg = compare.parse_args(train.DEFAULTS, spec["args"])
        assert REGISTRY[cfg["optimizer"]].run_label(cfg) == method
    assert len({compare.slug(m) for m in compare.METHODS}) == len(compare.METHODS)  # one folder name each


def test_both_batch_sizes_spend_the_same_tokens_with_the_same_schedule_shape():
    cfg = config()
    assert compare.schedule(cfg, 8) == (1562, 78, 195, 39)  # 0.8M tokens / 512 per step; 5% warmup; 8 evals; 40 logs
    assert compare.schedule(cfg, 128) == (98, 5, 12, 2)  # 0.8M / 8,192
    assert compare.tokens_per_step(cfg, 128) == 16 * compare.tokens_per_step(cfg, 8)
    for batch in (8, 128):
        assert abs(compare.schedule(cfg, batch)[0] * compare.tokens_per_step(cfg, batch) - 800_000) <= compare.tokens_per_step(cfg, batch)


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
def test_train_commands_carry_the_protocol(preset, tmp_path):
    """Every run of a batch size has the same horizon, schedule and model; the learning rate and
    rho are the sweep point's; the embeddings are not decayed; val is the whole split."""
    cfg = config(f"--preset={preset}") | {"out": str(tmp_path)}
    horizons = set()
    for batch in cfg["batch_sizes"]:
        for method in compare.METHODS:
            rho = 0.3 if method == compare.RHO_SEARCHED else None
            out_dir = compare.run_dir(cfg, batch, method, rho, 2e-3, 1)
            run = train_config(compare.train_command(cfg, batch, method, rho, 2e-3, 1, out_dir, resume=False))
            iters, warmup, eval_interval, log_interval = compare.schedule(cfg, batch)
            assert run["max_iters"] == run["lr_decay_iters"] == iters and run["warmup_iters"] == warmup
            assert run["learning_rate"] == 2e-3 and math.isclose(run["min_lr"], 2e-4)
            assert run["eval_interval"] == eval_interval and run["log_interval"] == log_interval
            assert run["batch_size"] == batch and run["gradient_accumulation_steps"] == 1
            assert run["decay_embeddings"] is False and run["val_full_split"] is True and run["seed"] == 1
            assert run["max_minutes"] == 0.0  # it would fix the horizon from the step time: not used
            assert (run["dropout"], run["bias"], run["init_from"]) == (0.0, False, "scratch")
            assert (run["n_layer"], run["n_embd"], run["block_size"]) == (cfg["n_layer"], cfg["n_embd"], cfg["block_size"])
            assert (run["device"], run["dtype"]) == (cfg["device"], cfg["dtype"])
            assert run["out_dir"] == os.path.abspath(out_dir)
            if method == compare.RHO_SEARCHED:
                assert run["rho"] == 0.3 and run["hess_interval"] == 10
            horizons.add((batch, iters))
    assert len(horizons) == len(cfg["batch_sizes"])
    if preset == "gpu":
        assert (cfg["device"], cfg["dtype"], cfg["workers"]) == ("cuda", "bfloat16", 8)
        assert cfg["run_timeout_minutes"] > 0
        assert compare.tokens_per_step(cfg, cfg["batch_sizes"][1]) == 16 * compare.tokens_per_step(cfg, cfg["batch_sizes"][0])
    else:
        assert (cfg["device"], cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["block_size"]) == ("cpu", 2, 2, 128, 64)
        assert (cfg["workers"], cfg["threads_per_run"], cfg["batch_sizes"]) == (2, 1, (8, 128))


def test_a_command_line_flag_beats_the_preset():
    cfg = config("--preset=gpu", "--workers=4", "--batch_sizes=(32,)")
    assert cfg["workers"] == 4 and cfg["batch_sizes"] == (32,) and cfg["device"] == "cuda"


def test_one_batch_size_may_be_given_bare(tiny_bpe_data):
    assert compare.config_from(["--batch_sizes=128", f"--data_dir={tiny_bpe_data}"])["batch_sizes"] == (128,)
    assert compare.config_from(["--batch_sizes=8,128", f"--data_dir={tiny_bpe_data}"])["batch_sizes"] == (8, 128)
    assert compare.config_from(["--adamw_lrs=3e-3", f"--data_dir={tiny_bpe_data}"])["adamw_lrs"] == (3e-3,)


def test_reach_interpolates_between_evaluations():
    steps, bpc = np.array([0, 250, 500, 750]), np.array([10.0, 4.0, 3.0, 2.5])
    assert report.reach(steps, bpc, 3.5) == 375
    assert report.reach(steps, bpc, 3.0) == 500
    assert report.reach(steps, bpc, 2.0) is None


def fake_sweep(monkeypatch, score):
    """Run the sweep with score(batch, method, rho, lr) as each run's final bits/char."""
    trained = []
    monkeypatch.setattr(compare, "run_all", lambda cfg, jobs: trained.extend(jobs))
    monkeypatch.setattr(compare, "final_bpc", lambda cfg, batch, method, rho, lr, seed: score(batch, method, rho, lr))
    return trained


def test_sweep_extends_edge_grids_by_2x_and_each_batch_size_on_its_own(monkeypatch):
    """The best lr is 8x the grid's first value at batch 8 and inside the grid at batch 128."""
    def score(batch, method, rho, lr):
        best = {8: 8, 128: 2}[batch] * compare.initial_grids(compare.DEFAULTS)[(method, rho)][0]
        return abs(math.log2(lr / best)) + (abs(math.log2(rho / 0.3)) if rho else 0)

    trained = fake_sweep(monkeypatch, score)
    results = compare.sweep(config())
    assert all(seed == 0 for *_, seed in trained)
    assert len(trained) == len(set(trained))  # no run twice
    small, large = results[8], results[128]
    # AdamW: 1e-3 .. 8e-3 holds 8e-3 at its edge -> 1.6e-2 added; then 8e-3 is inside
    assert small["grids"][("AdamW", None)] == [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]
    assert small["winners"]["AdamW"] == (None, 8e-3)
    # Muon's best (8e-3) is two steps past its edge: the first extension reaches it, the second makes it inner
    assert small["grids"][("Muon", None)] == [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]
    assert not grids_module.on_edge(small["grids"], "Muon", None, 8e-3)
    assert large["grids"][("AdamW", None)] == [1e-3, 2e-3, 4e-3, 8e-3]  # 2e-3 inside: untouched
    assert large["winners"]["AdamW"] == (None, 2e-3)
    assert large["winners"][compare.RHO_SEARCHED] == (0.3, 1e-3)  # 2x the rho-0.3 row's first value


def test_sweep_adds_a_rho_row_beside_a_best_rho_on_the_edge(monkeypatch):
    """Best rho beyond the largest (2): a rho-4 row is added with the rho-2 grid scaled by 2; a
    winner that stays on an edge after max_extensions is inconclusive."""
    def score(batch, method, rho, lr):
        return abs(math.log2(lr / 2e-3)) + (abs(math.log2(rho / 100)) if rho else 0)

    fake_sweep(monkeypatch, score)
    cfg = config("--batch_sizes=(8,)", "--max_extensions=1")
    result = compare.sweep(cfg)[8]
    grids = result["grids"]
    assert grids_module.rhos_of(grids, compare.RHO_SEARCHED) == [0.05, 0.3, 2.0, 4.0]
    assert grids[(compare.RHO_SEARCHED, 4.0)] == [2e-3, 4e-3, 8e-3]  # rho 2's 1e-3..4e-3 x 2
    rho, lr = result["winners"][compare.RHO_SEARCHED]
    assert rho == 4.0 and grids_module.on_edge(grids, compare.RHO_SEARCHED, rho, lr)


def test_a_diverged_sweep_run_scores_infinity(tmp_path):
    cfg = config() | {"out": str(tmp_path)}
    out_dir = compare.run_dir(cfg, 8, "AdamW", None, 8e-3, 0)
    os.makedirs(out_dir)
    open(os.path.join(out_dir, compare.DIVERGED), "w").close()
    assert compare.finished(out_dir, 1562)
    assert compare.final_bpc(cfg, 8, "AdamW", None, 8e-3, 0) == math.inf


class FakeTrain:
    """Stands in for train.py's process: records the command, writes the last evaluation."""

    def __init__(self, timeout=False):
        self.commands, self.timeout, self.signals = [], timeout, []

    def __call__(self, command, **kwargs):
        self.commands.append(command)
        out_dir = next(a.split("=", 1)[1] for a in command if a.startswith("--out_dir="))
        iters = next(int(a.split("=", 1)[1]) for a in command if a.startswith("--max_iters="))
        with open(os.path.join(out_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps({"event": "eval", "iter": iters, "val_bpc": 7.0, "time": 0.0}) + "\n")
        return self

    def wait(self, timeout=None):
        if self.timeout and not self.signals:
            raise subprocess.TimeoutExpired("train.py", timeout)
        return 0

    def send_signal(self, signum):
        self.signals.append(signum)


def test_an_interrupted_run_resumes_from_its_checkpoint_which_is_then_deleted(tmp_path, monkeypatch):
    cfg = config() | {"out": str(tmp_path)}
    out_dir = compare.run_dir(cfg, 128, "Muon", None, 2e-3, 1)
    os.makedirs(out_dir)
    open(os.path.join(out_dir, "ckpt.pt"), "w").close()
    fake = FakeTrain()
    monkeypatch.setattr(compare.subprocess, "Popen", fake)
    compare.run_one(cfg, 128, "Muon", None, 2e-3, 1)
    assert "--init_from=resume" in fake.commands[0]
    assert not os.path.exists(os.path.join(out_dir, "ckpt.pt"))
    compare.run_one(cfg, 128, "Muon", None, 2e-3, 1)  # finished: skipped
    assert len(fake.commands) == 1


def test_the_wall_clock_guard_stops_a_run_with_sigterm_and_says_how_to_resume(tmp_path, monkeypatch):
    import signal

    from opengpt.cli import UserError

    cfg = config("--preset=gpu") | {"out": str(tmp_path)}
    fake = FakeTrain(timeout=True)
    monkeypatch.setattr(compare.subprocess, "Popen", fake)
    with pytest.raises(UserError, match="run_timeout_minutes=5.*rerun the same command"):
        compare.run_one(cfg, 16, "AdamW", None, 1e-3, 1)
    assert fake.signals == [signal.SIGTERM]


def test_verdicts_follow_the_sign_of_every_seed():
    assert report.verdict(np.array([-0.1, -0.02, -0.3])) == "better than AdamW on every seed"
    assert report.verdict(np.array([0.1, 0.02, 0.3])) == "worse than AdamW on every seed"
    assert "noise" in report.verdict(np.array([-0.1, 0.02, -0.3]))


@pytest.mark.parametrize("small, large, words", [(0.10, 0.04, "narrows"), (0.10, 0.20, "does not narrow"),
                                                  (0.10, -0.05, "reverses: SophiaG is behind"),
                                                  (-0.10, 0.05, "reverses: SophiaG is ahead"),
                                                  (-0.05, -0.10, "grows in SophiaG's favour"), (-0.10, -0.05, "shrinks")])
def test_the_batch_size_sentence_follows_the_gaps(small, large, words):
    assert report.gap_trend(small, large).startswith(words)


@pytest.mark.parametrize("argv, words", [(["--sweep_seed=1", "--seeds=(1,2,3)"], "sweep_seed=1 is one of --seeds"),
                                          (["--preset=tpu"], "--preset=tpu"),
                                          (["--batch_sizes=(0,)"], "--batch_sizes"),
                                          (["--sophiag_lrs={0.3: 1e-3}"], "a tuple per rho"),
                                          (["--muon_lrs=(1e-3,-1e-3)"], "--muon_lrs must hold positive")])
def test_mistakes_are_user_errors(argv, words, tiny_bpe_data):
    from opengpt.cli import UserError

    with pytest.raises(UserError, match=words.replace("(", r"\(")):
        compare.config_from([*argv, f"--data_dir={tiny_bpe_data}"])


def test_dry_run_runs_the_whole_pipeline_and_a_rerun_trains_nothing(tiny_bpe_data, tmp_path, monkeypatch):
    """Sweep, finals (real train.py runs), the report (table and plots) at a toy size, end to end;
    then the same command again finds every run finished."""
    out = tmp_path / "compare"
    argv = ["compare_optimizers.py", "--dry_run=True", f"--out={out}", f"--data_dir={tiny_bpe_data}"]
    monkeypatch.setattr(sys, "argv", argv)
    compare.main()
    text = (out / "results.md").read_text(encoding="utf-8")
    for method in compare.METHODS:
        assert f"| {method} |" in text
    assert "### 2 x 16 = 32 tokens per step" in text and "### 8 x 16 = 128 tokens per step" in text
    assert "inconclusive" in text  # one-value grids and no extensions: every winner is on an edge
    assert f"Command: `python -m logs.compare_optimizers {' '.join(argv[1:])}`." in text  # the report names its command
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # written whole: no temp file left
    for image in ("val_bpc_32_tokens.png", "val_bpc_128_tokens.png", "gap_vs_batch.png"):
        assert (out / image).read_bytes()[:4] == b"\x89PNG"
    runs = sorted((out / "runs" / "2x16").iterdir())
    assert len(runs) == 4 + 4  # a sweep point and a seed per method
    assert all((r / "metrics.jsonl").is_file() and not (r / "ckpt.pt").exists() for r in runs)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(compare.subprocess, "Popen", no_training)
    cfg = compare.config_from(argv[1:])
    results = compare.sweep(cfg)
    compare.run_all(cfg, [(b, m, rho, lr, s) for b, r in results.items() for m, (rho, lr) in r["winners"].items()
                          for s in cfg["seeds"]])


def test_an_interrupted_dry_run_removes_the_temp_folder_it_made(tiny_bpe_data, tmp_path, monkeypatch):
    import tempfile

    def interrupted(cfg):
        assert os.path.isdir(cfg["out"]) and os.path.dirname(cfg["out"]) == str(tmp_path)
        raise KeyboardInterrupt

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(compare, "sweep", interrupted)
    monkeypatch.setattr(sys, "argv", ["compare_optimizers.py", "--dry_run=True", f"--data_dir={tiny_bpe_data}"])
    with pytest.raises(KeyboardInterrupt):
        compare.main()
    assert os.listdir(tmp_path) == []


def test_an_out_under_a_file_is_one_line(tiny_bpe_data, tmp_path, monkeypatch):
    from opengpt.cli import UserError

    (tmp_path / "file").write_text("", encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["compare_optimizers.py", f"--out={tmp_path / 'file' / 'x'}", f"--data_dir={tiny_bpe_data}"])
    with pytest.raises(UserError, match="cannot make --out="):
        compare.main()

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from opengpt import checkpoint as ckpt
from opengpt import cli
from opengpt.run_setup import setup_distributed
from opengpt.schedule import Schedule
from opengpt.training import diverged_message
import train
from conftest import REPO, TINY_MODEL_ARGS, assert_user_error, read_events, run_script


def train_args(tiny_data, out_dir, *extra):
    return [f"--data_dir={tiny_data}", f"--out_dir={out_dir}", *TINY_MODEL_ARGS, "--warmup_iters=2",
            "--eval_iters=2", "--log_interval=1", *extra]


def train_ok(*args):
    result = run_script("train.py", *args)
    assert result.returncode == 0, result.stderr
    return result


def test_short_cpu_run_lowers_the_val_loss_clearly(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = train_ok(*train_args(tiny_data, out, "--max_iters=60", "--lr_decay_iters=60", "--eval_interval=30",
                                  "--learning_rate=1e-2", "--min_lr=1e-3"))
    evals = read_events(out, "eval")
    assert [e["iter"] for e in evals] == [0, 30, 60]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 3.0, evals
    assert "iter 59: loss" in result.stdout and "step 60: train loss" in result.stdout
    assert "tokens per optimizer step: 64 = 4 batch x 16 block x 1 accumulation x 1 processes" in result.stdout


def test_metrics_jsonl_records_the_config_and_every_step(tiny_data, tmp_path):
    out = tmp_path / "run"
    train_ok(*train_args(tiny_data, out, "--max_iters=5", "--lr_decay_iters=5", "--eval_interval=5"))
    config = read_events(out, "config")[0]
    assert config["config"]["max_iters"] == 5 and config["torch"] == torch.__version__
    steps = read_events(out, "train")
    assert [e["iter"] for e in steps] == list(range(5))
    assert all(e["mfu"] > 0 and e["tokens_per_sec"] > 0 and e["time_ms"] > 0 for e in steps)


@pytest.mark.parametrize("optimizer", ["adamw", "sophiag"])
def test_resume_continues_the_run_exactly(tiny_data, tmp_path, optimizer):
    """8 steps straight == 4 steps + resume + 4 steps, loss for loss and weight for weight (fp32, CPU).
    Dropout is on, so the random states must be restored too."""
    common = ["--dropout=0.1", f"--optimizer={optimizer}", "--hess_interval=3", "--lr_decay_iters=8", "--eval_interval=4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_ok(*train_args(tiny_data, straight, *common, "--max_iters=8"))
    train_ok(*train_args(tiny_data, resumed, *common, "--max_iters=4"))
    assert torch.load(resumed / "ckpt.pt", weights_only=True)["iter_num"] == 4
    result = train_ok(*train_args(tiny_data, resumed, *common, "--max_iters=8", "--init_from=resume"))
    assert "iter 4: loss" in result.stdout and "iter 3: loss" not in result.stdout

    def losses(out):
        return {e["iter"]: e["loss"] for e in read_events(out, "train")}
    assert losses(straight) == losses(resumed)
    a = torch.load(straight / "ckpt.pt", weights_only=True)
    b = torch.load(resumed / "ckpt.pt", weights_only=True)
    assert a["iter_num"] == b["iter_num"] == 8
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_run_resumes_in_another_dtype(tiny_data, tmp_path):
    """Moving a run to a machine with other number formats: a float32 checkpoint goes on in float16
    (whose GradScaler then starts afresh) and back."""
    out = tmp_path / "run"
    train_ok(*train_args(tiny_data, out, "--max_iters=3", "--lr_decay_iters=9", "--eval_interval=3"))
    train_ok(*train_args(tiny_data, out, "--max_iters=6", "--lr_decay_iters=9", "--eval_interval=3", "--init_from=resume", "--dtype=float16"))
    train_ok(*train_args(tiny_data, out, "--max_iters=9", "--lr_decay_iters=9", "--eval_interval=3", "--init_from=resume"))
    assert [e["iter"] for e in read_events(out, "train")] == list(range(9))


LONG_RUN = ("--max_iters=100000", "--lr_decay_iters=100000", "--eval_interval=100000")


def start_training(tiny_data, out, *extra):
    """A long run in the background, returned once it has logged 3 steps (so it holds out_dir)."""
    process = subprocess.Popen([sys.executable, f"{REPO}/train.py", *train_args(tiny_data, out, *LONG_RUN, *extra)],
                               cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        log = out / "metrics.jsonl"
        if log.exists() and log.read_text(encoding="utf-8").count('"event": "train"') >= 3:
            return process
        time.sleep(0.2)
    process.kill()
    pytest.fail(f"the run did not get going: {process.communicate()}")


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_a_checkpoint_and_exits_with_128_plus_its_number(tiny_data, tmp_path, sig, status):
    """Stopped is not finished: `train.py && export.py` must not go on, so the status is non-zero."""
    out = tmp_path / "run"
    process = start_training(tiny_data, out)
    try:
        process.send_signal(sig)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == status, stderr
    assert f"received {sig.name}: stopping with exit status {status}" in stdout and "--init_from=resume" in stdout
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert checkpoint["iter_num"] >= 3
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "metrics.jsonl"]  # the lock is released


def test_a_second_run_on_a_busy_out_dir_is_refused_naming_the_first(tiny_data, tmp_path):
    """Two real processes contend for one out_dir: the second, whatever it was asked to do, gets one
    line naming the first one's pid and writes nothing; the first run's log and checkpoint stay whole."""
    out = tmp_path / "run"
    first = start_training(tiny_data, out, "--ckpt_interval=1")
    try:
        for extra in ([], ["--init_from=resume"], ["--overwrite_out_dir=True"]):
            second = run_script("train.py", *train_args(tiny_data, out, "--max_iters=3", "--lr_decay_iters=3", *extra))
            assert_user_error(second, f"{out} is being written by another train.py (pid {first.pid})")
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 143
    events = read_events(out)
    assert [e["event"] for e in events].count("config") == 1
    last = max(e["iter"] for e in events if e["event"] == "train")
    assert [e["iter"] for e in events if e["event"] == "train"] == list(range(last + 1))
    assert ckpt.load(str(out / "ckpt.pt"))["iter_num"] == last + 1
    # the folder is free again: the run continues
    train_ok(*train_args(tiny_data, out, "--lr_decay_iters=100000", f"--eval_interval={last + 3}", f"--max_iters={last + 3}",
                         "--init_from=resume"))
    assert ckpt.load(str(out / "ckpt.pt"))["iter_num"] == last + 3


def test_a_killed_run_leaves_no_lock_that_stops_the_next(tiny_data, tmp_path):
    """kill -9 gives the run no chance to clean up: its lock file stays, but the lock died with it."""
    out = tmp_path / "run"
    first = start_training(tiny_data, out, "--ckpt_interval=1")
    first.kill()
    first.communicate(timeout=60)
    assert (out / ".lock").read_text() == f"{first.pid}\n"
    saved = torch.load(out / "ckpt.pt", weights_only=True)["iter_num"]
    train_ok(*train_args(tiny_data, out, "--lr_decay_iters=100000", f"--eval_interval={saved + 1}",
                         f"--max_iters={saved + 1}", "--init_from=resume"))
    assert not (out / ".lock").exists()


def test_a_new_run_never_overwrites_an_earlier_one_by_mistake(tiny_data, tmp_path):
    out = tmp_path / "run"
    short = ("--max_iters=3", "--lr_decay_iters=3", "--eval_interval=3")
    train_ok(*train_args(tiny_data, out, *short, "--keep_best_checkpoint=True"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["ckpt.pt", "ckpt_best.pt", "metrics.jsonl"]
    # forgetting --init_from=resume: refused, and metrics.jsonl is not truncated
    assert_user_error(run_script("train.py", *train_args(tiny_data, out, *short)),
                      "holds the checkpoint of an earlier run", "--init_from=resume", "--overwrite_out_dir=True")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # asked for explicitly: the earlier run is gone, its best checkpoint too, so a later resume can
    # never pick up the earlier run's state
    train_ok(*train_args(tiny_data, out, "--max_iters=4", "--lr_decay_iters=4", "--eval_interval=4", "--overwrite_out_dir=True"))
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "metrics.jsonl"]
    assert ckpt.load(str(out / "ckpt.pt"))["iter_num"] == 4 and len(read_events(out, "config")) == 1


def test_a_resumed_runs_first_evaluation_keeps_the_best_checkpoint_it_finds(tiny_data, tmp_path):
    """A signal just before an evaluation saves ckpt.pt with weights no evaluation has seen; the resumed run
    evaluates them first. Here the checkpoint is made so by hand: iter 6's evaluation taken back from it."""
    out = tmp_path / "run"
    short = ("--max_iters=6", "--lr_decay_iters=6", "--eval_interval=3", "--keep_best_checkpoint=True")
    train_ok(*train_args(tiny_data, out, *short))
    state = ckpt.load(str(out / "ckpt.pt"))
    assert state["iter_num"] == 6 and ckpt.load(str(out / "ckpt_best.pt"))["iter_num"] == 6
    (out / "ckpt_best.pt").unlink()
    state["best_val_loss"] = 1e9  # as if no evaluation had scored these weights yet
    ckpt.save({k: v for k, v in state.items() if k != "checksum"}, str(out / "ckpt.pt"))
    train_ok(*train_args(tiny_data, out, *short, "--init_from=resume"))
    best = ckpt.load(str(out / "ckpt_best.pt"))
    assert best["iter_num"] == 6 and best["best_val_loss"] < 1e9
    assert ckpt.load(str(out / "ckpt.pt"))["best_val_loss"] == 1e9  # ckpt.pt itself is not rewritten


def test_a_run_from_pretrained_weights_logs_the_shape_it_used(tiny_data, tmp_path):
    """--init_from a transformers folder takes its shape from the weights; the config logged and
    saved must say so, not repeat the command line's --n_layer/--n_embd."""
    transformers = pytest.importorskip("transformers")
    hf_dir, out = tmp_path / "hf", tmp_path / "run"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32)).save_pretrained(hf_dir)
    train_ok(*train_args(tiny_data, out, "--max_iters=3", "--lr_decay_iters=3", "--eval_interval=3", f"--init_from={hf_dir}"))
    logged = read_events(out, "config")[0]["config"]
    saved = torch.load(out / "ckpt.pt", weights_only=True)["config"]
    for config in (logged, saved):
        assert (config["n_layer"], config["n_head"], config["n_embd"], config["block_size"]) == (2, 2, 32, 16)


@pytest.mark.parametrize("script, extra, optimizer", [("train_sophiag.py", [], "sophiag"), ("train_adam.py", [], "adamw"),
                                                      ("train_sophiag.py", ["--optimizer=muon"], "muon")])
def test_the_sophia_projects_scripts_are_train_py_with_their_optimizer_as_default(tiny_data, tmp_path, script, extra, optimizer):
    """train_adam.py and train_sophiag.py pass their optimizer to train.main as the default; a config
    file or --optimizer still wins."""
    out = tmp_path / "run"
    result = run_script(script, *train_args(tiny_data, out, "--max_iters=1", "--lr_decay_iters=3", "--eval_interval=1",
                                            "--hess_interval=1", *extra))
    assert result.returncode == 0, result.stderr
    assert read_events(out, "config")[0]["config"]["optimizer"] == optimizer


def test_non_finite_losses_are_skipped_then_stop_the_run(tiny_data, tmp_path, monkeypatch, capsys):
    """After good steps and a saved checkpoint, the loss turns NaN: the steps are skipped and
    counted, and after max_bad_steps in a row the run stops with the checkpoint intact."""
    import model as model_module

    out = tmp_path / "run"
    real_forward = model_module.GPT.forward
    calls = {"n": 0}

    def forward_that_breaks(self, idx, targets=None, **kwargs):
        logits, loss = real_forward(self, idx, targets, **kwargs)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] > 4:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(model_module.GPT, "forward", forward_that_breaks)
    monkeypatch.setattr(sys, "argv", ["train.py", *train_args(tiny_data, out, "--max_iters=50", "--lr_decay_iters=50",
                                                               "--eval_interval=4", "--max_bad_steps=3")])
    with pytest.raises(cli.UserError, match="3 consecutive steps had a non-finite loss") as stopped:
        train.main()
    printed = capsys.readouterr().out
    assert "iter 4: non-finite loss or gradient, step skipped (1 in a row)" in printed
    # not called good (it may already be diverging), and no --dtype=float32 advice to a float32 run
    message = str(stopped.value)
    assert f"the latest checkpoint, {out}/ckpt.pt (iter 4)" in message and "may already be diverging" in message
    assert "good" not in message and "float32" not in message and "lower --learning_rate" in message
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert checkpoint["iter_num"] == 4
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())


def test_stop_on_divergence_advises_float32_only_to_runs_in_lower_precision():
    cfg = dict(out_dir="out")
    message = diverged_message(10, 7, None, cfg, "bfloat16")
    assert "no checkpoint of this run was saved" in message and "--dtype=float32 instead of bfloat16" in message


def test_learning_rate_schedule_warms_up_then_decays_fully():
    schedule = Schedule(decay_lr=True, learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110, max_iters=120)
    rates = [schedule.learning_rate_at(it) for it in range(120)]
    assert rates[0] < rates[5] < rates[9] < 1.0
    assert max(rates) == pytest.approx(1.0) and rates[10] == pytest.approx(1.0)
    assert rates[60] == pytest.approx(0.55)  # half way through the cosine
    assert rates[110] == rates[119] == 0.1


def test_a_run_from_pretrained_weights_resumes_with_its_own_command(tiny_data, tmp_path):
    """The flags' shape (1 layer, 16 wide) is not the weights' (2 layers, 32 wide): "the same command plus
    --init_from=resume", as a stopped run advises, was refused for it; twice, as a resume records the source."""
    transformers = pytest.importorskip("transformers")
    hf_dir, out = tmp_path / "hf", tmp_path / "run"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32)).save_pretrained(hf_dir)
    common = ("--lr_decay_iters=9", "--eval_interval=3")
    train_ok(*train_args(tiny_data, out, *common, "--max_iters=3", f"--init_from={hf_dir}"))
    for max_iters in (5, 6):
        train_ok(*train_args(tiny_data, out, *common, f"--max_iters={max_iters}", f"--init_from={hf_dir}", "--init_from=resume"))
        saved = torch.load(out / "ckpt.pt", weights_only=True)
        assert saved["iter_num"] == max_iters and saved["config"]["weights_from"] == str(hf_dir)
        assert (saved["config"]["n_layer"], saved["config"]["n_embd"], saved["model_args"]["n_layer"]) == (2, 32, 2)
    # what the run chose itself stays fixed
    assert_user_error(run_script("train.py", *train_args(tiny_data, out, *common, "--max_iters=7", "--init_from=resume",
                                                         "--block_size=8")), "block_size 16", "--block_size=16")


def test_a_resume_on_another_data_folder_says_so(tiny_data, tmp_path):
    out, other = tmp_path / "run", tmp_path / "other_data"
    shutil.copytree(tiny_data, other)
    train_ok(*train_args(tiny_data, out, "--max_iters=2", "--lr_decay_iters=4", "--eval_interval=2"))
    same = train_ok(*train_args(tiny_data, out, "--max_iters=3", "--lr_decay_iters=4", "--eval_interval=2", "--init_from=resume"))
    assert "note: the checkpoint's run trained on" not in same.stdout
    moved = train_ok(*train_args(tiny_data, out, "--max_iters=4", "--lr_decay_iters=4", "--eval_interval=2", "--init_from=resume",
                                 f"--data_dir={other}"))
    assert f"note: the checkpoint's run trained on {tiny_data}; this one goes on with {other}" in moved.stdout


def test_periodic_and_best_checkpoints(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = train_ok(*train_args(tiny_data, out, "--max_iters=5", "--lr_decay_iters=5", "--eval_interval=2",
                                  "--ckpt_interval=3", "--always_save_checkpoint=False", "--keep_best_checkpoint=True"))
    saves = [line.split(" at iter ")[1] + ":" + line.split("/")[-1].split(" ")[0]
             for line in result.stdout.splitlines() if line.startswith("saved checkpoint")]
    # best (and, as the val loss improves, latest) at each evaluation after 0; latest every 3 steps
    # ckpt.pt first (a resume needs it), then the best as a second name of the same file
    assert saves == ["2:ckpt.pt", "2:ckpt_best.pt", "3:ckpt.pt", "4:ckpt.pt", "4:ckpt_best.pt", "5:ckpt.pt", "5:ckpt_best.pt"]
    best = torch.load(out / "ckpt_best.pt", weights_only=True)
    assert best["best_val_loss"] == min(e["val_loss"] for e in read_events(out, "eval"))


@pytest.mark.parametrize("always_save", [True, False])
def test_a_periodic_save_where_an_evaluation_saves_anyway_is_not_written_twice(tiny_data, tmp_path, always_save):
    result = train_ok(*train_args(tiny_data, tmp_path / "run", "--max_iters=6", "--lr_decay_iters=6", "--eval_interval=3",
                                  "--ckpt_interval=2", f"--always_save_checkpoint={always_save}"))
    saves = [line.split("/")[-1].replace(" at iter ", ":") for line in result.stdout.splitlines() if line.startswith("saved checkpoint")]
    # 6 is both the interval's and the last evaluation's: once; without always_save, the evaluation saves it
    # whatever its val loss, as the interval would have
    assert [save for save in saves if save.startswith("ckpt.pt")] == ["ckpt.pt:2", "ckpt.pt:3", "ckpt.pt:4", "ckpt.pt:6"]


@pytest.mark.parametrize("device", ["cuda:0", "cuda:1"])
def test_a_named_gpu_under_torchrun_is_a_user_error(monkeypatch, device):
    """Under torchrun each process trains on cuda:LOCAL_RANK; --device=cuda:N would put every rank on
    GPU N. It is refused before any process group starts."""
    for name, value in dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(cli.UserError, match=f"--device={device} names one GPU.*pass --device=cuda"):
        setup_distributed("auto", device)


def test_a_backend_that_cannot_work_is_a_user_error(tiny_data, tmp_path, monkeypatch):
    """nanoGPT's configs say backend = 'nccl': off a GPU that was a traceback on every rank."""
    assert_user_error(run_script("train.py", *train_args(tiny_data, tmp_path / "run", "--backend=foo")),
                      "--backend must be one of auto, gloo, nccl, mpi, ucc, got foo")
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(cli.UserError, match="--backend=nccl needs CUDA GPUs, and this run is on cpu; use --backend=auto"):
        setup_distributed("nccl", "cpu")


def test_a_resume_that_takes_other_tokens_per_step_says_so(tiny_data, tmp_path):
    """Another number of processes (or accumulation) changes the batch a resumed run trains on: said in the log."""
    out = tmp_path / "run"
    train_ok(*train_args(tiny_data, out, "--max_iters=2", "--lr_decay_iters=4", "--eval_interval=2"))
    assert torch.load(out / "ckpt.pt", weights_only=True)["config"]["world_size"] == 1
    same = train_ok(*train_args(tiny_data, out, "--max_iters=3", "--lr_decay_iters=4", "--eval_interval=2", "--init_from=resume"))
    assert "note: the checkpoint's run took" not in same.stdout
    other = train_ok(*train_args(tiny_data, out, "--max_iters=4", "--lr_decay_iters=4", "--eval_interval=2", "--init_from=resume",
                                 "--gradient_accumulation_steps=2"))
    assert "note: the checkpoint's run took 64 tokens per step (1 processes x 1 accumulation); this one takes 128" in other.stdout

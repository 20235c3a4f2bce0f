import signal
import subprocess
import sys
import time

import pytest
import torch

import cli
import train
from conftest import REPO, TINY_MODEL_ARGS, read_events, run_script


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


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tiny_data, tmp_path):
    out = tmp_path / "run"
    args = train_args(tiny_data, out, "--max_iters=100000", "--lr_decay_iters=100000", "--eval_interval=100000")
    process = subprocess.Popen([sys.executable, f"{REPO}/train.py", *args], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if (out / "metrics.jsonl").exists() and len(read_events(out, "train")) >= 3:
                break
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert "received SIGTERM" in stdout and "--init_from=resume" in stdout
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert checkpoint["iter_num"] >= 3


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
    with pytest.raises(cli.UserError, match="3 consecutive steps had a non-finite loss"):
        train.main()
    printed = capsys.readouterr().out
    assert "iter 4: non-finite loss or gradient, step skipped (1 in a row)" in printed
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert checkpoint["iter_num"] == 4
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())


def test_learning_rate_schedule_warms_up_then_decays_fully():
    cfg = dict(decay_lr=True, learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110)
    rates = [train.learning_rate_at(it, cfg) for it in range(120)]
    assert rates[0] < rates[5] < rates[9] < 1.0
    assert max(rates) == pytest.approx(1.0) and rates[10] == pytest.approx(1.0)
    assert rates[60] == pytest.approx(0.55)  # half way through the cosine
    assert rates[110] == rates[119] == 0.1


def test_periodic_and_best_checkpoints(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = train_ok(*train_args(tiny_data, out, "--max_iters=5", "--lr_decay_iters=5", "--eval_interval=2",
                                  "--ckpt_interval=3", "--always_save_checkpoint=False", "--keep_best_checkpoint=True"))
    saves = [line.split(" at iter ")[1] + ":" + line.split("/")[-1].split(" ")[0]
             for line in result.stdout.splitlines() if line.startswith("saved checkpoint")]
    # best (and, as the val loss improves, latest) at each evaluation after 0; latest every 3 steps
    assert saves == ["2:ckpt_best.pt", "2:ckpt.pt", "3:ckpt.pt", "4:ckpt_best.pt", "4:ckpt.pt", "5:ckpt_best.pt", "5:ckpt.pt"]
    best = torch.load(out / "ckpt_best.pt", weights_only=True)
    assert best["best_val_loss"] == min(e["val_loss"] for e in read_events(out, "eval"))


@pytest.mark.parametrize("device", ["cuda:0", "cuda:1"])
def test_a_named_gpu_under_torchrun_is_a_user_error(monkeypatch, device):
    """Under torchrun each process trains on cuda:LOCAL_RANK; --device=cuda:N would put every rank on
    GPU N. It is refused before any process group starts."""
    for name, value in dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(cli.UserError, match=f"--device={device} names one GPU.*pass --device=cuda"):
        train.setup_distributed("auto", device)

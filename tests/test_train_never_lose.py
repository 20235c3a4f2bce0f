"""Never lose a run (issue 26, the training cases): a diverging run never replaces a good checkpoint,
a new run never truncates an earlier run's log, a refused run leaves the lock file it never held
alone, and an error leaves nothing behind, so the rerun it suggests works. Real processes; every
file at stake is checksummed before and after."""
import hashlib
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import REPO, TINY_MODEL_ARGS, assert_user_error, read_events, run_script
from opengpt import checkpoint as ckpt
from opengpt import folder_lock
from opengpt.cli import UserError
from opengpt.run_setup import claim_out_dir

GOOD_RUN = ("--max_iters=10", "--lr_decay_iters=10", "--eval_interval=5")
# from the good run's iter 10, a rate that blows the weights up at the first step (its own loss is finite)
DIVERGING = ("--init_from=resume", "--learning_rate=1e6", "--max_iters=30", "--lr_decay_iters=30", "--eval_interval=5")


def train_args(data, out, *extra):
    return [f"--data_dir={data}", f"--out_dir={out}", *TINY_MODEL_ARGS, "--warmup_iters=2", "--eval_iters=2",
            "--log_interval=1", *extra]


def checksums(folder):
    """{path inside folder: sha256} of every file in it, hidden ones included; {} if it does not exist."""
    sums = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                sums[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return sums


@pytest.fixture(scope="module")
def good_run(tiny_data, tmp_path_factory):
    """A finished run's folder (ckpt.pt at iter 10, metrics.jsonl); tests work on copies."""
    out = tmp_path_factory.mktemp("good") / "run"
    result = run_script("train.py", *train_args(tiny_data, out, *GOOD_RUN))
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture
def copy_of_good_run(good_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    return out


# 1. a diverging run

@pytest.mark.parametrize("extra", [
    [],  # the steps after the blow-up fail: evaluations while they do save nothing, then max_bad_steps stops it
    ["--max_bad_steps=1000"],  # evaluations find the losses broken
    ["--ckpt_interval=1", "--max_bad_steps=1000"],  # a save between evaluations, right after the step that blew up
    ["--eval_interval=1", "--max_bad_steps=1000"],  # an evaluation right after it
])
def test_a_diverging_run_never_replaces_the_good_checkpoint(tiny_data, copy_of_good_run, extra):
    out = copy_of_good_run
    before = checksums(out)
    result = run_script("train.py", *train_args(tiny_data, out, *DIVERGING, *extra))
    assert_user_error(result, f"the latest checkpoint, {out}/ckpt.pt (iter 10), is kept", "lower --learning_rate",
                      "--init_from=resume")
    assert checksums(out) == before  # the checkpoint, and the log without the failed run's lines


@pytest.mark.parametrize("overwrite", [True, False])
def test_fine_tuning_a_run_into_its_own_folder_is_refused_and_keeps_it(tiny_data, copy_of_good_run, overwrite):
    """--overwrite_out_dir=True removed the earlier run's files before the new run's first save: the weights
    it was starting from. An error before that save (here too few minutes) lost them."""
    before = checksums(copy_of_good_run)
    result = run_script("train.py", *train_args(tiny_data, copy_of_good_run, f"--init_from={copy_of_good_run}",
                                                f"--overwrite_out_dir={overwrite}", "--max_minutes=0.001", "--warmup_iters=12"))
    assert_user_error(result, "is --out_dir itself", "--init_from=resume")
    assert checksums(copy_of_good_run) == before


def test_the_issues_diverging_run_stops_on_non_finite_losses(tiny_data, tmp_path):
    """The issue's own shape, whose blown-up weights give NaN losses: that evaluation is not saved
    over the good checkpoint, and the run does not exit 0."""
    out = tmp_path / "run"
    shape = ["--device=cpu", "--dtype=float32", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
             "--batch_size=4", "--gradient_accumulation_steps=1", "--eval_iters=2", "--warmup_iters=2", "--eval_interval=10"]
    common = [f"--data_dir={tiny_data}", f"--out_dir={out}", *shape]
    assert run_script("train.py", *common, "--max_iters=20", "--lr_decay_iters=20").returncode == 0
    before = checksums(out)
    result = run_script("train.py", *common, "--init_from=resume", "--learning_rate=1e6", "--max_iters=60",
                        "--lr_decay_iters=60", "--max_bad_steps=1000")
    assert_user_error(result, "the model diverged by iter", "(iter 20), is kept", "lower --learning_rate")
    assert "val loss nan" in result.stdout
    assert checksums(out) == before


def test_a_stop_signal_while_steps_fail_saves_nothing(tiny_data, copy_of_good_run):
    """SIGTERM normally saves a checkpoint and exits 143; while the steps fail, that checkpoint
    would be the blown-up weights: nothing is saved and the run says why."""
    out = copy_of_good_run
    before = checksums(out)
    args = train_args(tiny_data, out, "--init_from=resume", "--learning_rate=1e6", "--max_iters=100000",
                      "--lr_decay_iters=100000", "--eval_interval=100000", "--max_bad_steps=100000")
    process = subprocess.Popen([sys.executable, f"{REPO}/train.py", *args], cwd=REPO, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        for line in process.stdout:
            if "non-finite loss or gradient, step skipped" in line:
                process.send_signal(signal.SIGTERM)
                break
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 2, stderr
    assert "consecutive steps had a non-finite loss or gradient" in stderr and "(iter 10), is kept" in stderr
    assert checksums(out) == before


def test_a_new_run_that_diverges_leaves_nothing_and_its_rerun_works(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = run_script("train.py", *train_args(tiny_data, out, *GOOD_RUN, "--learning_rate=1e6"))
    assert_user_error(result, "no checkpoint of this run was saved", "lower --learning_rate")
    assert not out.exists()
    assert run_script("train.py", *train_args(tiny_data, out, *GOOD_RUN)).returncode == 0


def test_an_infinite_learning_rate_is_refused_before_anything_is_written(tiny_data, tmp_path):
    out = tmp_path / "run"
    assert_user_error(run_script("train.py", *train_args(tiny_data, out, *GOOD_RUN, "--min_lr=1e999")), "--min_lr")
    assert not out.exists()


# 2. an earlier run's log

def test_a_new_run_never_truncates_an_earlier_runs_log(tiny_data, copy_of_good_run):
    """The checkpoint was moved away (after an export, say); the log stays the earlier run's."""
    out = copy_of_good_run
    (out / "ckpt.pt").unlink()
    before = checksums(out)
    earlier_log = (out / "metrics.jsonl").read_bytes()
    assert_user_error(run_script("train.py", *train_args(tiny_data, out, *GOOD_RUN)),
                      f"{out} holds the log of an earlier run (metrics.jsonl)", "another --out_dir", "--overwrite_out_dir=True")
    assert checksums(out) == before
    # an evaluation only adds its lines
    result = run_script("train.py", *train_args(tiny_data, out, "--eval_only=True"))
    assert result.returncode == 0, result.stderr
    log = (out / "metrics.jsonl").read_bytes()
    assert log.startswith(earlier_log) and len(read_events(out, "eval")) == 3 + 1
    # asked for explicitly, the earlier log is replaced, as --overwrite_out_dir says
    result = run_script("train.py", *train_args(tiny_data, out, *GOOD_RUN, "--overwrite_out_dir=True"))
    assert result.returncode == 0, result.stderr
    assert len(read_events(out, "config")) == 1


@pytest.mark.parametrize("extra", [["--init_from=resume"], ["--init_from=resume", "--overwrite_out_dir=True"]])
def test_an_evaluation_changes_no_checkpoint_and_only_appends_to_the_log(tiny_data, copy_of_good_run, extra):
    out = copy_of_good_run
    checkpoint = checksums(out)["ckpt.pt"]
    earlier_log = (out / "metrics.jsonl").read_bytes()
    result = run_script("train.py", *train_args(tiny_data, out, *GOOD_RUN, "--eval_only=True", *extra))
    assert result.returncode == 0, result.stderr
    assert "saved checkpoint" not in result.stdout
    assert checksums(out)["ckpt.pt"] == checkpoint
    assert (out / "metrics.jsonl").read_bytes().startswith(earlier_log)


@pytest.mark.parametrize("extra", [[], ["--overwrite_out_dir=True"]])
def test_an_evaluation_of_untrained_weights_in_a_runs_folder_is_refused(tiny_data, copy_of_good_run, extra):
    """It would add an iteration-0 evaluation of random weights to the run's log, which plot_loss then reads
    as a restart that hides the run's curve."""
    before = checksums(copy_of_good_run)
    result = run_script("train.py", *train_args(tiny_data, copy_of_good_run, *GOOD_RUN, "--eval_only=True", *extra))
    assert_user_error(result, "--eval_only=True with --init_from=scratch would evaluate untrained weights", "--init_from=resume")
    assert checksums(copy_of_good_run) == before


# 5. out_dir/.lock

@pytest.mark.parametrize("lock_file", [b"my notes: keep\n", b"12345\n"])  # someone's file; a killed run's lock
def test_a_refused_run_leaves_the_lock_file_as_it_was(tiny_data, copy_of_good_run, lock_file):
    out = copy_of_good_run
    (out / ".lock").write_bytes(lock_file)
    before = checksums(out)
    assert_user_error(run_script("train.py", *train_args(tiny_data, out, *GOOD_RUN)), "holds the checkpoint of an earlier run")
    assert checksums(out) == before


def test_a_lock_file_that_is_not_ours_is_locked_but_never_truncated_or_removed(tiny_data, copy_of_good_run):
    out = copy_of_good_run
    (out / ".lock").write_bytes(b"my notes: keep\n")
    result = run_script("train.py", *train_args(tiny_data, out, "--init_from=resume", "--max_iters=12",
                                                "--lr_decay_iters=12", "--eval_interval=6"))
    assert result.returncode == 0, result.stderr
    assert (out / ".lock").read_bytes() == b"my notes: keep\n"


@pytest.mark.parametrize("kind", ["link", "folder"])
def test_a_lock_that_is_a_link_or_a_folder_is_refused_and_left_alone(tiny_data, tmp_path, kind):
    """A link is never followed: what it points at (here a user's file holding just a number, which
    a lock file of ours would look like) is not ours to truncate."""
    out, users_file = tmp_path / "run", tmp_path / "users_file"
    out.mkdir()
    users_file.write_bytes(b"4242\n")
    if kind == "link":
        (out / ".lock").symlink_to(users_file)
    else:
        (out / ".lock").mkdir()
    result = run_script("train.py", *train_args(tiny_data, out, *GOOD_RUN))
    assert_user_error(result, f"{out}/.lock is a link or a folder, not the lock file train.py keeps there")
    assert users_file.read_bytes() == b"4242\n"
    assert os.path.islink(out / ".lock") if kind == "link" else (out / ".lock").is_dir()
    assert sorted(os.listdir(out)) == [".lock"]


def test_folder_lock_writes_and_removes_only_a_lock_file_of_its_own(tmp_path):
    (tmp_path / ".lock").write_bytes(b"my notes: keep\n")
    lock = folder_lock.FolderLock(str(tmp_path), "train.py", inside=True)
    with pytest.raises(UserError, match=r"being written by another train.py \(pid unknown\)"):
        folder_lock.FolderLock(str(tmp_path), "train.py", inside=True)
    lock.release()
    assert (tmp_path / ".lock").read_bytes() == b"my notes: keep\n"
    # what a killed holder leaves, its pid alone, is a lock file of ours: taken over, then removed
    (tmp_path / ".lock").write_bytes(b"999999\n")
    lock = folder_lock.FolderLock(str(tmp_path), "train.py", inside=True)
    assert (tmp_path / ".lock").read_bytes() == f"{os.getpid()}\n".encode()
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_a_checkpoint_saved_while_the_lock_is_taken_is_still_refused(tmp_path, monkeypatch):
    """The refusal comes before the lock and again under it: another run may save in between."""
    out = tmp_path / "run"
    real_lock = folder_lock.FolderLock

    def lock_just_after_another_run_saved(folder, holder, inside=False):
        (out / "ckpt.pt").write_bytes(b"the other run's checkpoint")
        return real_lock(folder, holder, inside)

    monkeypatch.setattr(folder_lock, "FolderLock", lock_just_after_another_run_saved)
    cfg = dict(out_dir=str(out), init_from="scratch", eval_only=False, overwrite_out_dir=False)
    with pytest.raises(UserError, match="holds the checkpoint of an earlier run"):
        claim_out_dir(cfg)
    assert checksums(out) == {"ckpt.pt": hashlib.sha256(b"the other run's checkpoint").hexdigest()}


# 31. an error leaves nothing behind

def test_a_budget_error_leaves_nothing_and_the_rerun_it_suggests_works(tiny_data, tmp_path):
    out = tmp_path / "run"
    args = train_args(tiny_data, out, "--max_iters=20", "--lr_decay_iters=20", "--eval_interval=10")
    assert_user_error(run_script("train.py", *args, "--max_minutes=0.2"), "--max_minutes needs --warmup_iters of at least 12")
    assert not out.exists()
    # an evaluation (at iter 10) comes before the budget is decided (at iter 12): it saves nothing
    assert_user_error(run_script("train.py", *args, "--warmup_iters=12", "--max_minutes=0.001"), "give more minutes")
    assert not out.exists()
    result = run_script("train.py", *args, "--warmup_iters=12", "--max_minutes=0.2")
    assert result.returncode == 0, result.stderr


def test_an_error_in_a_folder_of_the_users_leaves_it_as_it_was(tiny_data, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    before = checksums(out)
    args = train_args(tiny_data, out, "--max_iters=20", "--lr_decay_iters=20", "--eval_interval=10", "--warmup_iters=12")
    assert_user_error(run_script("train.py", *args, "--max_minutes=0.001"), "give more minutes")
    assert checksums(out) == before


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_float16_gradients_that_stay_non_finite_are_faults_once_the_scaler_runs_out_of_scale(grad_clip):
    """A float16 overflow is routine: the GradScaler skips the step and halves its scale. A gradient that is
    not finite at any scale (NaN) must still end the run as divergence does in other dtypes, not skip
    every step from then on while checkpoints go on being saved; a step taken at such a scale is no fault."""
    import torch
    import bench
    from configurator import parse_args
    from opengpt.training import train_step

    cfg = parse_args(bench.DEFAULTS, ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=8", "--batch_size=2",
                                      "--vocab_size=64", "--dropout=0.0", f"--grad_clip={grad_clip}"])
    t = bench.build_training(cfg, "cpu", "adamw", "float16")
    bias = t.raw_model.transformer.h[0].mlp.c_fc.bias
    broken = [1]  # steps whose gradient is NaN: the first only (an overflow), then every one
    bias.register_hook(lambda grad: grad * float("nan") if broken[0] else grad)
    first = train_step(t, 0)
    assert not first.faulty and t.scaler.get_scale() == 2.0**15  # skipped, the scale halved from 2**16
    broken[0] = 0
    assert not train_step(t, 1).faulty and t.scaler.get_scale() == 2.0**15  # a clean step: stepped
    broken[0] = 1
    weights = bias.detach().clone()
    faulty = [train_step(t, i).faulty for i in range(2, 22)]
    # skipped at 2**14, ..., 2**0 (not faults), then 2**-1 and below: faults, the weights never touched
    assert faulty == [False] * 15 + [True] * 5
    assert torch.equal(bias.detach(), weights)
    broken[0] = 0  # the gradients finite again: the steps are taken at the low scale, and none is a fault
    assert [train_step(t, i).faulty for i in range(22, 25)] == [False] * 3
    assert t.scaler.get_scale() < 1 and not torch.equal(bias.detach(), weights)


# 3. the best weights, a weight average, an earlier run that --overwrite_out_dir=True replaces

def test_keeping_only_improvements_a_later_save_never_replaces_the_best(tiny_data, tmp_path):
    """--always_save_checkpoint=False: ckpt.pt held the best weights until a stop or --ckpt_interval saved the
    latest over them. The best are kept as ckpt_best.pt too, under a second name of the same file."""
    out = tmp_path / "run"
    result = run_script("train.py", *train_args(tiny_data, out, *GOOD_RUN, "--always_save_checkpoint=False"))
    assert result.returncode == 0, result.stderr
    evals = read_events(out, "eval")
    assert evals[-1]["val_loss"] < min(e["val_loss"] for e in evals[:-1])  # iter 10 is the best
    assert os.path.samefile(out / "ckpt.pt", out / "ckpt_best.pt")  # a hard link: not written twice
    best = (out / "ckpt_best.pt").read_bytes()
    # a rate of 1e-12 leaves the weights as they are (below float32's resolution), so no evaluation improves
    # on iter 10; the interval saves ckpt.pt
    result = run_script("train.py", *train_args(tiny_data, out, "--init_from=resume", "--always_save_checkpoint=False",
                                                "--learning_rate=1e-12", "--min_lr=0", "--ckpt_interval=1", "--max_iters=12",
                                                "--lr_decay_iters=12", "--eval_interval=100"))
    assert result.returncode == 0, result.stderr
    assert (out / "ckpt_best.pt").read_bytes() == best
    assert ckpt.load(str(out / "ckpt.pt"))["iter_num"] == 12 and ckpt.load(str(out / "ckpt_best.pt"))["iter_num"] == 10


# train.py whose every evaluation finds a val loss higher than the one before
GETTING_WORSE = f"""
import sys
sys.path.insert(0, {REPO!r})
import train
from opengpt import cli
evaluate, evaluations = train.evaluate, [0]
def worse(*args, **kwargs):
    metrics = evaluate(*args, **kwargs)
    evaluations[0] += 1
    metrics["val"]["loss"] += evaluations[0]
    return metrics
train.evaluate = worse
sys.argv[0] = "train.py"
cli.run(train.main)
"""


def test_keeping_only_improvements_a_run_that_never_improves_says_so(tiny_data, copy_of_good_run, tmp_path):
    """Only an improvement on the val loss at iter 0 was saved: a run with none ended with exit status 0,
    nothing saved and a log that turned the rerun away."""
    out = tmp_path / "new"
    keep_best = ("--always_save_checkpoint=False", "--eval_interval=2")
    result = subprocess.run([sys.executable, "-c", GETTING_WORSE, *train_args(tiny_data, out, *keep_best, "--max_iters=4",
                                                                              "--lr_decay_iters=4")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert_user_error(result, "no evaluation of iters 0-4 beat the best val loss", "nothing was saved",
                      "--always_save_checkpoint=True")
    assert not out.exists()  # so the rerun it suggests is not refused
    before = checksums(copy_of_good_run)
    result = subprocess.run([sys.executable, "-c", GETTING_WORSE, *train_args(tiny_data, copy_of_good_run, *keep_best,
                                                                              "--init_from=resume", "--max_iters=14",
                                                                              "--lr_decay_iters=14")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert_user_error(result, "no evaluation of iters 10-14", "ckpt.pt still holds iter 10")
    assert checksums(copy_of_good_run) == before


def test_a_resume_without_the_runs_weight_average_is_refused(tiny_data, tmp_path):
    """Without --ema_decay a resumed run evaluated and saved its trained weights where the average was,
    ckpt_best.pt included, and said nothing; --eval_only reported the trained weights' loss."""
    out = tmp_path / "run"
    result = run_script("train.py", *train_args(tiny_data, out, *GOOD_RUN, "--ema_decay=0.9", "--keep_best_checkpoint=True"))
    assert result.returncode == 0, result.stderr
    before = checksums(out)
    for extra in (["--max_iters=12", "--lr_decay_iters=12"], ["--eval_only=True"]):
        result = run_script("train.py", *train_args(tiny_data, out, "--init_from=resume", *extra))
        assert_user_error(result, "was trained with ema_decay 0.9", "pass --ema_decay=0.9")
    assert checksums(out) == before


def test_an_evaluation_of_a_checkpoint_saved_between_evaluations_evaluates_it(tiny_data, copy_of_good_run):
    """A stop or --ckpt_interval saves at any iteration; --eval_only evaluated only at a multiple of
    --eval_interval, and otherwise printed no loss and exited 0."""
    result = run_script("train.py", *train_args(tiny_data, copy_of_good_run, "--init_from=resume", "--eval_only=True",
                                                "--eval_interval=3", "--max_iters=20", "--lr_decay_iters=20"))
    assert result.returncode == 0, result.stderr
    assert "step 10: train loss" in result.stdout and read_events(copy_of_good_run, "eval")[-1]["iter"] == 10


def test_ctrl_c_ends_an_evaluation_at_once_and_takes_back_its_lines(tiny_data, copy_of_good_run):
    """An evaluation saves nothing, so a signal need not wait for it (it ran on, then exited 0)."""
    out = copy_of_good_run
    before, log_size = checksums(out), (out / "metrics.jsonl").stat().st_size
    args = train_args(tiny_data, out, "--init_from=resume", "--eval_only=True", "--eval_iters=1000000")
    process = subprocess.Popen([sys.executable, f"{REPO}/train.py", *args], cwd=REPO, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        for line in process.stdout:
            if line.startswith("model:"):  # logged once the evaluation is about to start
                break
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130 and "train.py: interrupted" in stderr, stderr
    assert (out / "metrics.jsonl").stat().st_size == log_size and checksums(out) == before


def test_an_overwriting_run_that_saves_nothing_puts_the_earlier_run_back(tiny_data, copy_of_good_run):
    """--overwrite_out_dir=True removed the earlier run at the start: a new run that then failed left nothing."""
    before = checksums(copy_of_good_run)
    result = run_script("train.py", *train_args(tiny_data, copy_of_good_run, *GOOD_RUN, "--overwrite_out_dir=True",
                                                "--learning_rate=1e6"))
    assert_user_error(result, "no checkpoint of this run was saved")
    assert checksums(copy_of_good_run) == before


def test_an_overwriting_run_killed_before_its_first_save_leaves_the_earlier_run_aside(tiny_data, copy_of_good_run):
    out = copy_of_good_run
    before = checksums(out)
    args = train_args(tiny_data, out, "--overwrite_out_dir=True", "--max_iters=100000", "--lr_decay_iters=100000",
                      "--eval_interval=100000")
    process = subprocess.Popen([sys.executable, f"{REPO}/train.py", *args], cwd=REPO, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        for line in process.stdout:
            if line.startswith("iter 2:"):
                break
        process.kill()
        process.communicate(timeout=60)
    finally:
        process.kill()
    assert checksums(out / ".replaced_run") == before
    for extra in (["--init_from=resume"], [*GOOD_RUN, "--overwrite_out_dir=True"]):
        result = run_script("train.py", *train_args(tiny_data, out, *extra))
        assert_user_error(result, f"{out}/.replaced_run holds the earlier run", "move its files back", "delete")
    for name in os.listdir(out / ".replaced_run"):  # kept: the earlier run goes on
        os.replace(out / ".replaced_run" / name, out / name)
    os.rmdir(out / ".replaced_run")
    result = run_script("train.py", *train_args(tiny_data, out, "--init_from=resume", "--max_iters=12", "--lr_decay_iters=12"))
    assert result.returncode == 0, result.stderr

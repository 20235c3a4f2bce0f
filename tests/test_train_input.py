"""train.py on input it used to accept wrongly, hang on or end in a traceback with (issue 26, items
11, 14, 18, 25, 26, 32): each now ends in one line, or does the right thing, in a real process."""
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO, TINY_MODEL_ARGS, assert_user_error, pause, read_events, run_script, tiny_documents

UNMEASURED = 10**9  # TimeBudget.UNMEASURED: a planned horizon stays below it
MEMORY_LIMIT = 8 * 2**30  # RLIMIT_AS of the out-of-memory runs: should an allocation succeed after all, it stays small


def train_on(data_dir, out_dir, *extra, timeout=120):
    return run_script("train.py", f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TINY_MODEL_ARGS, "--max_iters=20",
                      "--lr_decay_iters=20", "--warmup_iters=2", "--eval_interval=10", "--eval_iters=2", *extra,
                      timeout=timeout)


def start_train(data_dir, out_dir, *extra):
    """train.py as a process whose stdout the test reads line by line."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), f"--data_dir={data_dir}",
                             f"--out_dir={out_dir}", *TINY_MODEL_ARGS, "--eval_iters=2", "--log_interval=1",
                             "--learning_rate=1e-2", "--min_lr=1e-3", *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# items 25, 26 and 11's absurd budget: refused before anything is read or written
@pytest.mark.parametrize("args, words", [
    (["--max_minutes=-1"], ["--max_minutes must be between 0 (no time budget) and 525,600 (a year), got -1"]),
    (["--max_minutes=1e999", "--warmup_iters=12"], ["--max_minutes must be between 0", "got inf"]),
    (["--max_minutes=1e12", "--warmup_iters=12"], ["--max_minutes must be between 0", "(a year), got 1e+12"]),
    (["--min_lr=1.0", "--learning_rate=1e-3"], ["--min_lr=1 exceeds --learning_rate=0.001", "--decay_lr=False"]),
    (["--min_lr=1e999"], ["--min_lr must be a finite number, got inf"]),
    (["--learning_rate=1e999"], ["--learning_rate must be a finite number, got inf"]),
])
def test_budgets_and_learning_rates_that_mean_nothing_are_refused(tiny_data, tmp_path, args, words):
    out = tmp_path / "out"
    assert_user_error(train_on(tiny_data, out, *args, timeout=60), *words)
    assert not out.exists()


def test_a_nan_budget_in_a_config_file_is_refused(tiny_data, tmp_path):
    config = tmp_path / "budget.py"
    config.write_text("max_minutes = float('nan')\n", encoding="utf-8")
    out = tmp_path / "out"
    assert_user_error(train_on(tiny_data, out, config, timeout=60), "max_minutes in config file", "expects a number, got NaN")
    assert not out.exists()


def test_a_constant_rate_may_sit_above_min_lr_without_decay():
    import train
    from opengpt.run_setup import check_config
    check_config(dict(train.DEFAULTS, decay_lr=False, learning_rate=1e-3, min_lr=1.0))


# item 11: the longest budget accepted is planned at once, and the run still stops on SIGTERM
def test_a_year_long_budget_is_planned_at_once_and_stops_on_sigterm(tiny_data, tmp_path):
    out = tmp_path / "run"
    # an evaluation every step: the old search took a step down per evaluation, a minute or more here
    process = start_train(tiny_data, out, "--max_minutes=525600", "--warmup_iters=12", "--eval_interval=1")
    watchdog = threading.Timer(300, process.kill)
    watchdog.start()
    try:
        last_line_at = time.monotonic()
        for line in process.stdout:
            if line.startswith("time budget"):
                assert time.monotonic() - last_line_at < 10, "the horizon took long to plan"
                break
            last_line_at = time.monotonic()
        else:
            raise AssertionError("the run never planned its horizon")
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    finally:
        watchdog.cancel()
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM
    [planned] = read_events(out, "time_budget")
    assert planned["iter"] < planned["max_iters"] < UNMEASURED  # a resume must still see it as measured
    assert (out / "ckpt.pt").exists()


# item 32: a SIGSTOP during the timed warm-up is not taken for step time
PAUSE_SECONDS = 3.0


def test_a_pause_during_the_timed_warm_up_is_not_taken_for_step_time(tiny_data, tmp_path):
    out = tmp_path / "run"
    process = start_train(tiny_data, out, "--max_minutes=0.25", "--warmup_iters=200", "--eval_interval=1000")
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("iter 3:"):  # the steps from iter 2 on are timed
                pause(process, PAUSE_SECONDS)
                break
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    [planned] = read_events(out, "time_budget")
    steps = read_events(out, "train")
    paused = max(steps, key=lambda step: step["time_ms"])
    assert paused["time_ms"] >= 900 * PAUSE_SECONDS and paused["iter"] < planned["iter"]  # the pause was timed
    planned_ms = float(re.search(r"([\d.]+) ms per step", "".join(lines) + stdout)[1])
    assert planned_ms < 3 * statistics.median(step["time_ms"] for step in steps)
    [end] = read_events(out, "time_budget_end")
    # the time the pause lost counts: the run still ends inside its budget, and uses it
    assert 0.5 * end["budget_seconds"] <= end["elapsed_seconds"] <= 1.1 * end["budget_seconds"]


# item 14: resume with sampling=epochs on a train split re-prepared smaller
def prepare(corpus_folder, out, n_docs):
    corpus = corpus_folder / f"corpus{n_docs}.txt"
    corpus.write_text("\n".join(tiny_documents(n_docs)) + "\n", encoding="utf-8")
    result = run_script("prepare.py", f"--input={corpus}", f"--out={out}", "--min_val_docs=10", "--tokenizer=gpt2")
    assert result.returncode == 0, result.stderr


def test_resume_in_an_epoch_the_re_prepared_data_no_longer_has_is_one_line(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    prepare(tmp_path, data, 400)
    args = ("--sampling=epochs", "--max_iters=40", "--lr_decay_iters=40", "--eval_interval=40")
    assert train_on(data, out, *args).returncode == 0  # 160 windows into its first epoch
    prepare(tmp_path, data, 40)  # same tokenizer, a train split of about a hundred windows
    saved = (out / "ckpt.pt").read_bytes()
    result = train_on(data, out, *args, "--init_from=resume", "--max_iters=60", "--lr_decay_iters=60")
    assert_user_error(result, "the checkpoint stopped at window 160 of its epoch", "the data changed since the checkpoint",
                      "--sampling=random")
    assert (out / "ckpt.pt").read_bytes() == saved
    result = train_on(data, out, "--sampling=random", "--init_from=resume", "--max_iters=60", "--lr_decay_iters=60",
                      "--eval_interval=40")
    assert result.returncode == 0, result.stderr  # the fix the line names works


# item 18: out of memory on the CPU at start; each size asks for one allocation of petabytes, which fails at once
def train_in_limited_memory(data_dir, out_dir, *extra):
    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(REPO, "train.py"), f"--data_dir={data_dir}", f"--out_dir={out_dir}",
                           *TINY_MODEL_ARGS, "--max_iters=20", "--lr_decay_iters=20", "--warmup_iters=2", "--eval_iters=2",
                           *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=limit_memory)


def test_a_model_too_large_for_memory_is_one_line_before_anything_is_written(tiny_data, tmp_path):
    out = tmp_path / "out"
    result = train_in_limited_memory(tiny_data, out, "--n_embd=4000000000")
    wte_bytes = 50304 * 4_000_000_000 * 4  # the first weight built: GPT-2's vocabulary (padded) by n_embd, in float32
    assert_user_error(result, f"the model does not fit in memory on cpu: an allocation of {wte_bytes / 2**30:,.1f} GiB failed",
                      "use a smaller --n_embd or --n_layer")
    assert not out.exists()


def test_batches_too_large_for_memory_are_one_line_at_the_first_evaluation(tiny_data, tmp_path):
    result = train_in_limited_memory(tiny_data, tmp_path / "out", f"--batch_size={10**13}")
    assert_user_error(result, f"an evaluation on --batch_size={10**13} windows of --block_size=16 tokens does not fit "
                              f"in memory on cpu: an allocation of", "use a smaller --batch_size")


def test_batches_too_large_for_memory_are_one_line_at_the_first_step(tiny_data, tmp_path):
    out = tmp_path / "out"
    assert train_on(tiny_data, out, "--max_iters=10", "--lr_decay_iters=10").returncode == 0
    saved = (out / "ckpt.pt").read_bytes()
    # resumed at iter 10 with evaluations every 1000: a training step comes first
    result = train_in_limited_memory(tiny_data, out, "--init_from=resume", f"--batch_size={10**13}", "--eval_interval=1000")
    assert_user_error(result, f"a training step on --batch_size={10**13} windows", "does not fit in memory on cpu",
                      "a larger --gradient_accumulation_steps keeps the tokens per step")
    assert (out / "ckpt.pt").read_bytes() == saved


def test_only_failed_allocations_are_worded():
    from opengpt.cli import UserError
    from opengpt.training import fits_in_memory
    with pytest.raises(UserError, match=r"^the model does not fit in memory on cuda: an allocation of 2.00 GiB failed; fix$"):
        with fits_in_memory("the model", "cuda", "fix"):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.1 GiB")
    with pytest.raises(UserError, match="an allocation failed"):
        with fits_in_memory("the model", "cpu", "fix"):
            raise MemoryError
    with pytest.raises(RuntimeError, match="shape mismatch"):  # a bug stays loud
        with fits_in_memory("the model", "cpu", "fix"):
            raise RuntimeError("shape mismatch")

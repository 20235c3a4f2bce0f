"""train.py --max_minutes: the horizon comes from measured step time, the run ends inside its
budget with its schedule fully decayed, and a resumed run keeps the same schedule."""
import signal
import subprocess
import sys
import time

import pytest

import train
from conftest import REPO, TINY_MODEL_ARGS, assert_user_error, read_events, run_script
from opengpt import schedule as schedule_module
from opengpt.schedule import Schedule, TimeBudget

BUDGET_MINUTES = 0.2  # 12 s: long enough for a few hundred tiny steps on a slow, busy CI machine


def budget_args(data, out, *extra):
    return [f"--data_dir={data}", f"--out_dir={out}", *TINY_MODEL_ARGS, f"--max_minutes={BUDGET_MINUTES}",
            "--warmup_iters=12", "--eval_interval=50", "--eval_iters=2", "--log_interval=1", "--learning_rate=1e-2",
            "--min_lr=1e-3", *extra]


def test_run_ends_inside_its_budget_with_the_schedule_decayed(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = run_script("train.py", *budget_args(tiny_data, out))
    assert result.returncode == 0, result.stderr
    [planned] = read_events(out, "time_budget")
    horizon = planned["max_iters"]
    assert planned["iter"] == 12 and horizon == planned["lr_decay_iters"] > 12  # timed up to the warm-up's end
    [end] = read_events(out, "time_budget_end")
    # the guard keeps the run inside the budget unless one step or evaluation suddenly takes much
    # longer than the ones measured: allow a tenth for a busy machine
    assert end["elapsed_seconds"] <= 1.1 * end["budget_seconds"]
    assert end["elapsed_seconds"] >= 0.5 * end["budget_seconds"]  # and the budget was used, not wasted
    last_eval = read_events(out, "eval")[-1]
    steps = read_events(out, "train")
    if last_eval["iter"] == horizon:  # the plan held: the learning rate decayed all the way
        assert steps[-1]["iter"] == horizon - 1
        schedule = Schedule.from_config(dict(train.DEFAULTS, decay_lr=True, learning_rate=1e-2, min_lr=1e-3,
                                             warmup_iters=12, lr_decay_iters=horizon))
        assert steps[-1]["lr"] == schedule.learning_rate_at(horizon - 1)
    else:  # the machine slowed down: stopped by the guard, which says so
        assert "time budget reached" in result.stdout


def test_resume_continues_the_same_schedule(tiny_data, tmp_path):
    out = tmp_path / "run"
    args = budget_args(tiny_data, out)
    process = subprocess.Popen([sys.executable, f"{REPO}/train.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    for line in process.stdout:  # stop the run once its horizon is fixed
        if line.startswith("time budget") and "max_iters" in line:
            process.send_signal(signal.SIGTERM)
            break
    process.communicate(timeout=120)
    [planned] = read_events(out, "time_budget")
    horizon = planned["max_iters"]
    # resumed with another budget: the recorded horizon wins, nothing is measured again
    result = run_script("train.py", *args, "--init_from=resume", "--max_minutes=5")
    assert result.returncode == 0, result.stderr
    assert len(read_events(out, "time_budget")) == 1
    steps = read_events(out, "train")
    assert steps[-1]["iter"] == horizon - 1 and read_events(out, "eval")[-1]["iter"] == horizon
    schedule = Schedule.from_config(dict(train.DEFAULTS, learning_rate=1e-2, min_lr=1e-3, warmup_iters=12, lr_decay_iters=horizon))
    assert all(s["lr"] == schedule.learning_rate_at(s["iter"]) for s in steps)


def test_budget_needs_the_timing_steps_inside_warm_up(tiny_data, tmp_path):
    result = run_script("train.py", *budget_args(tiny_data, tmp_path / "run"), "--warmup_iters=5")
    assert_user_error(result, "--max_minutes needs --warmup_iters")


def test_a_budget_too_short_for_the_warm_up_shortens_it(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = run_script("train.py", *budget_args(tiny_data, out), "--warmup_iters=100000")
    assert result.returncode == 0, result.stderr
    [planned] = read_events(out, "time_budget")
    warmup = max(planned["iter"], planned["max_iters"] // 10)
    assert f"warm-up shortened to {warmup} steps" in result.stdout
    schedule = Schedule.from_config(dict(train.DEFAULTS, learning_rate=1e-2, min_lr=1e-3, warmup_iters=warmup,
                                         lr_decay_iters=planned["max_iters"]))
    after_fixing = [s for s in read_events(out, "train") if s["iter"] >= planned["iter"]]
    assert after_fixing and all(s["lr"] == schedule.learning_rate_at(s["iter"]) for s in after_fixing)


def fixed_horizon(monkeypatch, warmup_iters, step_seconds_at):
    """Drive a 10-minute TimeBudget by a fake clock whose step N takes step_seconds_at(N) seconds;
    return (the iteration the horizon was fixed after, the horizon, the step time it used)."""
    clock = [0.0]
    monkeypatch.setattr(schedule_module.time, "perf_counter", lambda: clock[0])
    budget = TimeBudget(eval_interval=10**6, world_size=1, device="cpu")
    schedule = budget.start(Schedule.from_config(dict(train.DEFAULTS, max_minutes=10.0, warmup_iters=warmup_iters)))
    for iter_num in range(1, 10_000):
        clock[0] += step_seconds_at(iter_num)
        schedule, note = budget.after_step(iter_num, schedule)
        if note:
            return iter_num, schedule.max_iters, budget.step_seconds
    raise AssertionError("the horizon was never fixed")


def test_the_horizon_comes_from_the_whole_warm_up(monkeypatch):
    # quick first steps, then the machine is busier: the warm-up's mean, not its first steps, decides
    fixed_after, horizon, step_seconds = fixed_horizon(monkeypatch, 50, lambda n: 0.125 if n <= 12 else 0.25)  # exact in binary
    assert fixed_after == 50
    assert step_seconds == pytest.approx((10 * 0.125 + 38 * 0.25) / 48)  # steps 3 to 50
    elapsed = 12 * 0.125 + 38 * 0.25
    assert horizon == 50 + int((600 - elapsed) / step_seconds)


def test_a_long_warm_up_is_timed_for_a_share_of_the_budget_only(monkeypatch):
    fixed_after, _, step_seconds = fixed_horizon(monkeypatch, 10_000, lambda n: 0.125)
    # 5% of the 10 minutes is 30 s: 240 steps of 0.125 s
    assert fixed_after == round(TimeBudget.TIMING_SHARE * 600 / 0.125)
    assert step_seconds == pytest.approx(0.125)


def test_a_resumed_run_keeps_the_saved_horizon_and_budget_whatever_its_flags_say():
    """The checkpoint's config holds the horizon and the budget it was fitted to: a resume (with
    another --max_minutes, or none) keeps both, so a resume of that resume does too. A checkpoint
    saved before the horizon was fixed has none: the resumed run measures again."""
    saved = dict(train.DEFAULTS, max_minutes=0.2, max_iters=321, lr_decay_iters=321, warmup_iters=30)
    for minutes in (0.0, 5.0):
        budget = TimeBudget(eval_interval=50, world_size=1, device="cpu")
        schedule = budget.start(Schedule.from_config(dict(train.DEFAULTS, max_minutes=minutes, warmup_iters=12)), saved)
        assert (schedule.max_iters, schedule.lr_decay_iters, schedule.warmup_iters, schedule.max_minutes) == (321, 321, 30, 0.2)
        assert not budget.enabled
    budget = TimeBudget(eval_interval=50, world_size=1, device="cpu")
    unmeasured = dict(saved, max_iters=TimeBudget.UNMEASURED, lr_decay_iters=TimeBudget.UNMEASURED)
    schedule = budget.start(Schedule.from_config(dict(train.DEFAULTS, max_minutes=5.0, warmup_iters=12)), unmeasured)
    assert budget.enabled and budget.seconds == 300 and schedule.max_iters == TimeBudget.UNMEASURED


def test_a_paused_step_is_left_out_of_the_step_time_but_its_time_is_spent(monkeypatch):
    # step 5 took 3 s (the process was stopped: SIGSTOP, a suspended machine), the others 0.125 s
    fixed_after, horizon, step_seconds = fixed_horizon(monkeypatch, 50, lambda n: 3.0 if n == 5 else 0.125)
    assert fixed_after == 50 and step_seconds == 0.125
    elapsed = 49 * 0.125 + 3.0
    assert horizon == 50 + int((600 - elapsed) / step_seconds)


def planned_horizon(monkeypatch, minutes, step_seconds, eval_seconds, eval_interval):
    """The horizon a TimeBudget of `minutes` plans after 12 steps of step_seconds and one evaluation."""
    clock = [0.0]
    monkeypatch.setattr(schedule_module.time, "perf_counter", lambda: clock[0])
    budget = TimeBudget(eval_interval=eval_interval, world_size=1, device="cpu")
    schedule = budget.start(Schedule.from_config(dict(train.DEFAULTS, max_minutes=minutes, warmup_iters=12)))
    clock[0] += eval_seconds
    budget.evaluated(eval_seconds)
    for iter_num in range(1, 13):
        clock[0] += step_seconds
        schedule, note = budget.after_step(iter_num, schedule)
    assert note is not None
    return schedule.max_iters, 60 * minutes - clock[0]


def test_the_horizon_is_the_last_iteration_that_fits(monkeypatch):
    step, evaluation, interval = 10.0, 100.0, 10
    horizon, seconds_left = planned_horizon(monkeypatch, 525_600, step, evaluation, interval)

    def fits(end):  # steps 12 .. end - 1, and the evaluations at every multiple of interval up to end, and at end
        return (end - 12) * step + (-(-end // interval) - 12 // interval) * evaluation <= seconds_left
    assert fits(horizon) and not fits(horizon + 1)


def test_a_horizon_beyond_unmeasured_is_found_at_once_and_kept_below_it(monkeypatch):
    # a year of 5 ms steps is 6e9 of them; the old search stepped down from there one evaluation at a time
    started = time.monotonic()  # real time: perf_counter is the budget's faked clock
    horizon, _ = planned_horizon(monkeypatch, 10**12, 0.005, 0.01, 10)
    assert time.monotonic() - started < 5
    assert horizon == TimeBudget.UNMEASURED - 1  # so that a resume sees a measured horizon

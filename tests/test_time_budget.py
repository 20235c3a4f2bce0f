"""train.py --max_minutes: the horizon comes from measured step time and follows the clock when
the machine's speed changes, the run ends at its budget with its schedule fully decayed, and a
resumed run continues the same decisions."""
import datetime
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import pytest

import train
from conftest import REPO, TINY_MODEL_ARGS, assert_user_error, pause, read_events, run_script
from opengpt import schedule as schedule_module
from opengpt.schedule import DECISIONS, Schedule, TimeBudget

BUDGET_MINUTES = 0.2  # 12 s: long enough for a few hundred tiny steps on a slow, busy CI machine
FLAGS = dict(learning_rate=1e-2, min_lr=1e-3, warmup_iters=12)  # budget_args' schedule flags


def budget_args(data, out, *extra):
    return [f"--data_dir={data}", f"--out_dir={out}", *TINY_MODEL_ARGS, f"--max_minutes={BUDGET_MINUTES}",
            "--warmup_iters=12", "--eval_interval=50", "--eval_iters=2", "--log_interval=1", "--learning_rate=1e-2",
            "--min_lr=1e-3", *extra]


def assert_steps_follow_the_decisions(out, flags=FLAGS):
    """Every logged learning rate is the one the latest decision logged at or before its step
    (time_budget, time_budget_replan) gives: what the run decided, not what the clock said, sets it."""
    decisions = [e for e in read_events(out) if e["event"] in ("time_budget", "time_budget_replan")]
    steps = read_events(out, "train")
    for step in steps:
        in_force = [d for d in decisions if d["iter"] <= step["iter"]]
        plan = ({key: in_force[-1][key] for key in DECISIONS} if in_force
                else dict(max_iters=TimeBudget.UNMEASURED, lr_decay_iters=TimeBudget.UNMEASURED))
        assert step["lr"] == Schedule.from_config(dict(train.DEFAULTS, **flags) | plan).learning_rate_at(step["iter"])
    return decisions, steps


def test_run_ends_inside_its_budget_with_the_schedule_decayed(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = run_script("train.py", *budget_args(tiny_data, out))
    assert result.returncode == 0, result.stderr
    [planned] = read_events(out, "time_budget")
    assert planned["iter"] == 12 and planned["max_iters"] == planned["lr_decay_iters"] > 12  # timed up to the warm-up's end
    [end] = read_events(out, "time_budget_end")
    # re-plans keep the run at its budget; only a sudden stall near the end stops it past OVERRUN:
    # allow a tenth for a busy machine
    assert 0.5 * end["budget_seconds"] <= end["elapsed_seconds"] <= 1.1 * end["budget_seconds"]
    decisions, steps = assert_steps_follow_the_decisions(out)
    if end["decay_finished"]:  # the plan held: the learning rate decayed all the way
        horizon = decisions[-1]["lr_decay_iters"]
        assert steps[-1]["iter"] == horizon - 1 and read_events(out, "eval")[-1]["iter"] == end["iter"] == horizon
        assert read_events(out, "eval")[-1]["lr"] == FLAGS["min_lr"]
    else:  # the machine stalled near the end: stopped by the guard, which says so
        assert "time budget reached" in result.stdout


def test_resume_continues_the_same_decisions_with_the_seconds_left(tiny_data, tmp_path):
    out = tmp_path / "run"
    args = budget_args(tiny_data, out)
    process = subprocess.Popen([sys.executable, f"{REPO}/train.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    for line in process.stdout:  # stop the run once its horizon is fixed
        if line.startswith("time budget") and "max_iters" in line:
            process.send_signal(signal.SIGTERM)
            break
    process.communicate(timeout=120)
    [stopped] = read_events(out, "time_budget_end")
    # resumed with another budget: the recorded one wins, with the seconds it had left; nothing is measured again
    result = run_script("train.py", *args, "--init_from=resume", "--max_minutes=5")
    assert result.returncode == 0, result.stderr
    assert f"keeps its own time budget ({BUDGET_MINUTES:g} min)" in result.stdout  # said, not silent
    assert len(read_events(out, "time_budget")) == 1
    first, end = read_events(out, "time_budget_end")
    assert end["budget_seconds"] == 60 * BUDGET_MINUTES and end["elapsed_seconds"] > first["elapsed_seconds"]
    assert end["elapsed_seconds"] <= 1.1 * end["budget_seconds"]
    # the steps after the resume follow the saved decisions until the resumed run decides otherwise
    decisions, steps = assert_steps_follow_the_decisions(out)
    resumed = [s for s in steps if s["iter"] >= stopped["iter"]]
    assert resumed and resumed[0]["iter"] == stopped["iter"]
    if end["decay_finished"]:
        assert steps[-1]["iter"] == decisions[-1]["lr_decay_iters"] - 1 == end["iter"] - 1


def test_budget_needs_the_timing_steps_inside_warm_up(tiny_data, tmp_path):
    result = run_script("train.py", *budget_args(tiny_data, tmp_path / "run"), "--warmup_iters=5")
    assert_user_error(result, "--max_minutes needs --warmup_iters")


def test_a_budget_too_short_for_the_warm_up_shortens_it(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = run_script("train.py", *budget_args(tiny_data, out), "--warmup_iters=100000")
    assert result.returncode == 0, result.stderr
    [planned] = read_events(out, "time_budget")
    warmup = max(planned["iter"], planned["max_iters"] // 10)
    assert planned["warmup_iters"] == warmup and f"warm-up shortened to {warmup} steps" in result.stdout
    assert_steps_follow_the_decisions(out, dict(FLAGS, warmup_iters=100000))


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


def test_a_resumed_run_keeps_the_saved_decisions_and_budget_whatever_its_flags_say(monkeypatch):
    """The checkpoint's config holds the decisions, the budget they were fitted to and the seconds it
    used: a resume (with another --max_minutes, or none) continues them with the seconds left, so a
    resume of that resume does too. A checkpoint saved before the horizon was fixed has none: the
    resumed run measures again. One saved before re-plans existed keeps its horizon, unwatched."""
    monkeypatch.setattr(schedule_module.time, "perf_counter", lambda: 1000.0)
    decided = dict(max_iters=321, lr_decay_iters=321, warmup_iters=30, decay_from_iter=200, decay_from_progress=0.375)
    saved = dict(train.DEFAULTS, max_minutes=0.2, **decided, budget_seconds_used=7.5, budget_longest_eval=0.25)
    for minutes in (0.0, 5.0):
        budget = TimeBudget(eval_interval=50, world_size=1, device="cpu")
        schedule = budget.start(Schedule.from_config(dict(train.DEFAULTS, max_minutes=minutes, warmup_iters=12)), saved)
        assert schedule.decisions() == decided and schedule.max_minutes == 0.2
        assert budget.enabled and budget.fixed and budget.seconds == 12 and budget.elapsed() == 7.5
        assert budget.saved_state() == dict(budget_seconds_used=7.5, budget_longest_eval=0.25)
    budget = TimeBudget(eval_interval=50, world_size=1, device="cpu")
    older = {key: value for key, value in saved.items() if not key.startswith(("budget_", "decay_from"))}
    schedule = budget.start(Schedule.from_config(dict(train.DEFAULTS, max_minutes=5.0, warmup_iters=12)), older)
    assert (schedule.max_iters, schedule.warmup_iters, schedule.decay_from_iter) == (321, 30, 0) and not budget.enabled
    budget = TimeBudget(eval_interval=50, world_size=1, device="cpu")
    unmeasured = dict(saved, max_iters=TimeBudget.UNMEASURED, lr_decay_iters=TimeBudget.UNMEASURED)
    schedule = budget.start(Schedule.from_config(dict(train.DEFAULTS, max_minutes=5.0, warmup_iters=12)), unmeasured)
    assert budget.enabled and budget.seconds == 300 and schedule.max_iters == TimeBudget.UNMEASURED
    assert budget.elapsed() == 0.0 and not budget.fixed


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


# -- the horizon follows the clock: a 10-minute budget driven by a fake clock ---------------------

MINUTES, WARMUP, STEP, EVAL_INTERVAL, EVAL_SECONDS = 10.0, 50, 0.25, 500, 2.0  # 0.25 s steps: exact in binary


def run_on_a_fake_clock(monkeypatch, step_seconds_at, stop_after=None, resumed_config=None, clock_start=0.0):
    """train.py's loop without the training: a TimeBudget of MINUTES driven by a fake clock on which a
    step takes step_seconds_at(elapsed share of the budget) and an evaluation EVAL_SECONDS. Checks
    that every re-plan keeps the learning rate continuous. Returns a dict: the iteration it ended
    at, the elapsed seconds, the final schedule, the learning rates by iteration, the notes."""
    clock = [clock_start]
    monkeypatch.setattr(schedule_module.time, "perf_counter", lambda: clock[0])
    budget = TimeBudget(eval_interval=EVAL_INTERVAL, world_size=1, device="cpu")
    flags = dict(train.DEFAULTS, max_minutes=MINUTES, warmup_iters=WARMUP, learning_rate=1.0, min_lr=0.1)
    schedule = budget.start(Schedule.from_config(flags), resumed_config)
    iter_num = resumed_config["iter_num"] if resumed_config else 0
    rates, notes = {}, []
    while True:
        rates[iter_num] = schedule.learning_rate_at(iter_num)
        if iter_num % EVAL_INTERVAL == 0 or iter_num == schedule.max_iters:
            clock[0] += EVAL_SECONDS
            budget.evaluated(EVAL_SECONDS)
        if iter_num >= schedule.max_iters or iter_num == stop_after:
            break
        clock[0] += step_seconds_at(budget.elapsed() / (60 * MINUTES))
        iter_num += 1
        before = schedule
        schedule, note = budget.after_step(iter_num, schedule)
        if note:
            notes.append((iter_num, *note))
        if note and note[0] == "time_budget_replan":
            assert schedule.learning_rate_at(iter_num) == before.learning_rate_at(iter_num)
    saved = asdict(schedule) | budget.saved_state() | dict(iter_num=iter_num)  # what a checkpoint would record
    return dict(iter=iter_num, elapsed=budget.elapsed(), schedule=schedule, rates=rates, notes=notes, saved=saved)


def paused_once(at_share, seconds):
    """Step times: STEP, but the first step from at_share of the budget on takes `seconds` (a SIGSTOP)."""
    paused = []

    def step_seconds_at(share):
        if share >= at_share and not paused:
            paused.append(share)
            return seconds
        return STEP
    return step_seconds_at


def assert_decay_finished_at_the_budget(run):
    assert abs(run["elapsed"] - 60 * MINUTES) <= 0.02 * 60 * MINUTES  # within 2% of the budget
    assert run["iter"] == run["schedule"].max_iters == run["schedule"].lr_decay_iters  # not stopped early
    assert run["rates"][run["iter"]] == 0.1  # the final evaluation's learning rate is min_lr
    assert 1 <= sum(event == "time_budget_replan" for _, event, _ in run["notes"]) <= 20  # re-planned, not every step


def test_a_steady_machine_gets_the_first_plan_exactly(monkeypatch):
    run = run_on_a_fake_clock(monkeypatch, lambda share: STEP)
    [(fixed_at, event, _)] = run["notes"]  # no re-plan
    assert (fixed_at, event) == (WARMUP, "time_budget")
    # the first plan, as before re-plans existed: the last iteration whose steps and evaluations fit
    elapsed = EVAL_SECONDS + WARMUP * STEP
    steps = int((600 - elapsed - 5 * EVAL_SECONDS) / STEP)  # evaluations at 500, 1000, 1500, 2000 and the end
    assert run["iter"] == WARMUP + steps and 2000 < run["iter"] < 2500
    assert run["elapsed"] <= 600 and run["elapsed"] > 600 - STEP
    plain = Schedule(learning_rate=1.0, min_lr=0.1, decay_lr=True, warmup_iters=WARMUP, lr_decay_iters=run["iter"],
                     max_iters=run["iter"])
    assert all(lr == plain.learning_rate_at(it) for it, lr in run["rates"].items())  # bit for bit


@pytest.mark.parametrize("step_seconds_at", [
    lambda share: 2 * STEP if 0.3 <= share < 0.5 else STEP,  # twice as slow for a fifth of the budget
    lambda share: STEP / 2 if 0.3 <= share < 0.5 else STEP,  # twice as fast for a fifth
    lambda share: STEP / 2 if share >= 0.1 else STEP,  # twice as fast after the warm-up: the first plan ends at half time
    lambda share: 2 * STEP if share >= 0.9 else STEP,  # twice as slow for the last tenth
    paused_once(0.5, 120.0),  # one step paused for a fifth of the budget
], ids=["slower", "faster", "faster_from_the_start", "slower_at_the_end", "paused"])
def test_the_decay_ends_at_the_budget_whatever_the_machine_does(monkeypatch, step_seconds_at):
    assert_decay_finished_at_the_budget(run_on_a_fake_clock(monkeypatch, step_seconds_at))


def test_a_pause_past_the_budget_stops_with_the_decay_unfinished(monkeypatch):
    run = run_on_a_fake_clock(monkeypatch, paused_once(0.95, 60.0))
    assert run["notes"][-1][1] == "time_budget_stop" and run["iter"] == run["schedule"].max_iters
    assert run["iter"] < run["schedule"].lr_decay_iters and run["rates"][run["iter"]] > 0.1


def test_a_resumed_run_continues_the_decisions_and_the_seconds_left(monkeypatch):
    """Stopped after a re-plan and resumed on a steady clock: the same learning rates, horizon and end as
    the uninterrupted run, whose clock the resumed one continues from the saved seconds used."""
    def slower(share):
        return 2 * STEP if 0.3 <= share < 0.5 else STEP
    whole = run_on_a_fake_clock(monkeypatch, slower)
    stop_at = next(it for it, event, _ in whole["notes"] if event == "time_budget_replan") + 700  # the slow part is over
    first = run_on_a_fake_clock(monkeypatch, slower, stop_after=stop_at)
    assert first["saved"]["decay_from_iter"] > WARMUP and first["saved"]["budget_seconds_used"] == first["elapsed"]
    resumed = run_on_a_fake_clock(monkeypatch, lambda share: STEP, resumed_config=first["saved"], clock_start=5000.0)
    decided = [(it, event) for it, event, _ in whole["notes"] if it > stop_at]
    assert [(it, event) for it, event, _ in resumed["notes"]] == decided  # here: none
    assert resumed["rates"] == {it: lr for it, lr in whole["rates"].items() if it >= stop_at}
    assert resumed["iter"] == whole["iter"] and resumed["elapsed"] == pytest.approx(whole["elapsed"])


def test_a_schedule_never_re_planned_is_the_plain_cosine_bit_for_bit():
    """--max_minutes=0 (and a steady machine) trains at exactly the learning rates of before re-plans."""
    for warmup, decay, lr, min_lr in ((10, 110, 1.0, 0.1), (2000, 600000, 6e-4, 6e-5), (12, 2163, 3e-3, 3e-4)):
        schedule = Schedule(learning_rate=lr, min_lr=min_lr, decay_lr=True, warmup_iters=warmup, lr_decay_iters=decay,
                            max_iters=decay)
        for it in (*range(warmup, warmup + 50), *range(decay - 50, decay), decay // 3, decay // 2):
            # the formula as train.py wrote it before re-plans
            plain = min_lr + 0.5 * (1.0 + math.cos(math.pi * ((it - warmup) / (decay - warmup)))) * (lr - min_lr)
            assert schedule.learning_rate_at(it) == plain


def test_a_re_planned_schedule_follows_its_progress_line():
    """A re-plan at iteration 300 of a decay planned 100 -> 1100 moves its end to 700: from there the
    cosine's progress grows linearly from where it stood (0.2) to 1 at 700, so the learning rate is
    continuous at 300 and min_lr from 700."""
    planned = Schedule(learning_rate=1.0, min_lr=0.1, decay_lr=True, warmup_iters=100, lr_decay_iters=1100, max_iters=1100)
    moved = Schedule(learning_rate=1.0, min_lr=0.1, decay_lr=True, warmup_iters=100, lr_decay_iters=700, max_iters=700,
                     decay_from_iter=300, decay_from_progress=0.2)

    def cosine(progress):  # written from the maths: min_lr + (lr - min_lr) (1 + cos(pi p)) / 2
        return 0.1 + 0.9 * (1 + math.cos(math.pi * progress)) / 2
    assert planned.learning_rate_at(300) == pytest.approx(cosine(0.2)) == moved.learning_rate_at(300)
    for it in (300, 400, 500, 650, 699):
        assert moved.learning_rate_at(it) == pytest.approx(cosine(0.2 + 0.8 * (it - 300) / 400), abs=1e-12)
    assert moved.learning_rate_at(700) == moved.learning_rate_at(800) == 0.1
    assert moved.learning_rate_at(50) == planned.learning_rate_at(50)  # the warm-up is the horizon's business no more


# -- end to end: a run stopped for a fifth of its budget still ends at it, its decay finished -------

def test_a_run_stopped_for_a_fifth_of_its_budget_re_plans_and_ends_at_it_decayed(tiny_data, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, f"{REPO}/train.py", *budget_args(tiny_data, out)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={"OMP_NUM_THREADS": "1", "PATH": ""})
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("time budget") and "max_iters" in line:  # planned: now the machine stops
                pause(process, 12 * BUDGET_MINUTES)  # a fifth of the budget's seconds
                break
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert "time budget re-planned" in "".join(lines) + stdout
    [planned] = read_events(out, "time_budget")
    replans = read_events(out, "time_budget_replan")
    assert replans and min(r["max_iters"] for r in replans) < planned["max_iters"]  # the lost fifth came off the horizon
    [end] = read_events(out, "time_budget_end")
    assert abs(end["elapsed_seconds"] - end["budget_seconds"]) <= 0.05 * end["budget_seconds"]
    assert end["decay_finished"] and read_events(out, "eval")[-1]["lr"] == FLAGS["min_lr"]
    assert_steps_follow_the_decisions(out)


# -- DDP: rank 0's clock decides ------------------------------------------------------------------

def decide_on_two_ranks(rank, store_path, out_dir):
    """One rank of a 2-process gloo group driving a 1-minute TimeBudget on its own fake clock: rank 1's
    steps take three times as long as rank 0's, and only rank 0 evaluates, as in train.py."""
    import torch.distributed as dist
    # a collective one rank misses fails after a minute instead of hanging the suite
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    clock = [0.0]
    schedule_module.time.perf_counter = lambda: clock[0]  # this forked process's own clock
    budget = TimeBudget(eval_interval=100, world_size=2, device="cpu", rank=rank)
    schedule = budget.start(Schedule.from_config(dict(train.DEFAULTS, max_minutes=1.0, warmup_iters=20)))
    iter_num, decisions = 0, []
    while iter_num < min(schedule.max_iters, 2000):  # a rank left unplanned would go on to UNMEASURED
        if rank == 0 and iter_num % 100 == 0:
            clock[0] += 1.0
            budget.evaluated(1.0)
        share = clock[0] / 60
        clock[0] += (0.125 if rank == 0 else 0.375) * (2 if 0.4 <= share < 0.6 else 1)
        iter_num += 1
        schedule, _ = budget.after_step(iter_num, schedule)
        decisions.append([iter_num, schedule.decisions(), budget.fixed])
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(decisions, f)


def test_every_rank_takes_rank_0s_decisions(tmp_path):
    import torch.multiprocessing
    torch.multiprocessing.start_processes(decide_on_two_ranks, args=(tmp_path / "store", str(tmp_path)), nprocs=2,
                                          start_method="fork")
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1]
    replans = {json.dumps(decided) for _, decided, _ in ranks[0]}
    assert len(replans) > 2  # unmeasured, the first plan, and re-plans for rank 0's slow fifth
    assert ranks[0][-1][0] == ranks[0][-1][1]["lr_decay_iters"]  # rank 0's clock: the decay finished

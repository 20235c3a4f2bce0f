"""How long a run trains and at what learning rate: the Schedule, and TimeBudget, which fits the
Schedule's horizon to --max_minutes from measured step time, and re-fits it as the machine's speed
changes, returning the new Schedule."""
import collections
import math
import statistics
import time
from dataclasses import dataclass, fields, replace

import torch
import torch.distributed as dist

from opengpt import hardware
from opengpt.cli import UserError

HORIZON = ("max_iters", "lr_decay_iters", "warmup_iters")
DECISIONS = (*HORIZON, "decay_from_iter", "decay_from_progress")  # what a time budget decides
MAX_MINUTES = 525_600  # a year: a larger --max_minutes is a typo (1e12), not a plan


@dataclass(frozen=True)
class Schedule:
    """Linear warmup for warmup_iters, cosine decay to min_lr at lr_decay_iters, then min_lr
    (learning_rate throughout without decay_lr); training stops at max_iters. Its first fields are
    the run's flags of the same names; a --max_minutes run's horizon is decided by TimeBudget, and
    checkpoints save it in their config as the run's flags (config | asdict(schedule)).

    The cosine follows a progress from 0 to 1 that grows linearly from decay_from_progress at
    decay_from_iter (0 at warmup_iters unless a time budget re-planned) to 1 at lr_decay_iters. A
    re-plan moves lr_decay_iters and restarts the line from where the progress stood, so the
    learning rate stays continuous and only the pace of the decay changes; the Schedule gives the
    learning rates from decay_from_iter on."""
    learning_rate: float
    min_lr: float
    decay_lr: bool
    warmup_iters: int
    lr_decay_iters: int
    max_iters: int
    max_minutes: float = 0.0  # the budget the horizon was fitted to; 0 = the horizon is the flags'
    decay_from_iter: int = 0  # the last re-plan's iteration; the progress line starts at the later of it and warmup_iters
    decay_from_progress: float = 0.0  # the progress there

    @classmethod
    def from_config(cls, cfg):
        return cls(**{f.name: cfg[f.name] for f in fields(cls) if f.name in cfg})

    def learning_rate_at(self, it):
        if not self.decay_lr:
            return self.learning_rate
        if it < self.warmup_iters:
            return self.learning_rate * (it + 1) / (self.warmup_iters + 1)
        if it >= self.lr_decay_iters:
            return self.min_lr
        coeff = 0.5 * (1.0 + math.cos(math.pi * self.decay_progress(it)))
        return self.min_lr + coeff * (self.learning_rate - self.min_lr)

    def decay_progress(self, it):
        """How far the decay has gone at iteration it (from decay_from_iter on): 0 before, 1 at lr_decay_iters."""
        start = max(self.decay_from_iter, self.warmup_iters)
        if it >= self.lr_decay_iters:
            return 1.0
        # without a re-plan, 0.0 + 1.0 * (it - warmup) / (...): bit for bit the plain cosine's progress
        return self.decay_from_progress + (1 - self.decay_from_progress) * (it - start) / (self.lr_decay_iters - start)

    def decisions(self):
        """What a time budget decides, for the log and for every rank to agree on."""
        return {key: getattr(self, key) for key in DECISIONS}


class TimeBudget:
    """--max_minutes: the schedule's horizon from measured step time, re-fitted as the run goes so that
    the decay ends at the budget whatever the machine does.

    The first plan. The clock starts with the training loop (start(); the first evaluation counts).
    The steps from FIRST_TIMED_ITER to the end of the warm-up are timed (the first ones pay for
    allocation and compiling), or fewer if the warm-up would take more than TIMING_SHARE of the
    budget, but at least up to MIN_LAST_TIMED_ITER. They lie inside the warm-up, whose learning
    rates do not depend on the horizon. Then max_iters = lr_decay_iters = the last step whose training
    and evaluations (each as long as the longest so far) still fit. The whole warm-up is timed, not a
    few steps, because a shared machine's step time drifts (the lab notebook, logs/README.md, has
    the runs that showed it). A step that took PAUSED times the median or longer is left out of the
    step time: the process was stopped (SIGSTOP, a suspended machine), not slow; the time it lost
    still counts as elapsed.

    Re-plans. A shared machine or a laptop changes speed during a run: a horizon fixed once stops the
    run before its decay ends, or ends it early. So every CHECK_SHARE of the budget (a step or a
    few) the horizon that would fit now is worked out as above from the recent step time (the steps
    of the last WINDOW_SHARE of the budget, paused ones left out) and the time left; when it differs
    from the plan by more than DRIFT of the budget's worth of steps, it becomes the plan
    (Schedule.decisions: the decay's progress goes on from where it stood, so the learning rate
    stays continuous). Re-planning on drift, not at fixed points: a steady machine never re-plans
    (its horizon is the first plan's), and a changing one re-plans as soon as the change costs
    DRIFT of the budget, at most once per REPLAN_GAP of it (the recent step time needs that long to
    follow a change; fewer log lines). Only when even one more step would end the run more than
    OVERRUN past its budget (a long pause near the end) does the run stop early, with an
    evaluation, its decay unfinished, and say so.

    Resume. Checkpoints save the decisions in their config (asdict(schedule)) and the budget's
    seconds used so far (saved_state()): a resumed run continues those decisions with the budget's
    remaining seconds (the saved budget wins over its flags), and re-plans once it has timed a few
    steps of its own. DDP: rank 0 alone evaluates, so its clock decides and every rank takes its
    decisions."""

    FIRST_TIMED_ITER, MIN_LAST_TIMED_ITER = 2, 12
    TIMING_SHARE = 0.05
    PAUSED = 10  # a timed step this many times the median was paused, not slow
    UNMEASURED = 10**9  # max_iters until the horizon is fixed: one no run reaches (horizons stay below it)
    WINDOW_SHARE, WINDOW_STEPS, MIN_WINDOW_STEPS = 0.05, 256, 8  # the recent step time: the last 5% of the budget
    DRIFT = 0.01  # re-plan when the horizon that fits now is this share of the budget away from the plan
    REPLAN_GAP = 0.02  # and this share of the budget has passed since the last re-plan
    OVERRUN = 0.03  # stop before the horizon when one more step would end the run this far past the budget
    CHECK_SHARE = 0.001  # the checks above, once per this share of the budget: not every step of a fast GPU

    def __init__(self, eval_interval, world_size, device, rank=0):
        self.eval_interval, self.world_size, self.device, self.rank = eval_interval, world_size, device, rank
        self.enabled = False

    def start(self, schedule, resumed_config=None):
        """Start the clock; return the schedule the run starts with: a resumed --max_minutes run's
        saved decisions, with --max_minutes one no run reaches until after_step fixes it, else
        `schedule` itself."""
        saved = resumed_config or {}
        resuming = bool(saved.get("max_minutes")) and saved["max_iters"] < self.UNMEASURED
        if resuming:
            schedule = replace(schedule, max_minutes=saved["max_minutes"],
                               **{key: saved[key] for key in DECISIONS if key in saved})
        self.seconds = schedule.max_minutes * 60
        self.enabled = self.seconds > 0 and (not resuming or "budget_seconds_used" in saved)
        if not self.enabled:  # no budget; or a checkpoint from before re-plans: its horizon as it was
            return schedule
        saved = saved if resuming else {}  # a run stopped before its horizon was fixed starts the budget afresh
        self.start_time = time.perf_counter() - saved.get("budget_seconds_used", 0.0)
        self.longest_eval, self.eval_seconds_since_step = saved.get("budget_longest_eval", 0.0), 0.0
        self.steps_taken, self.last_step_end, self.step_durations = 0, None, []  # this process's steps
        self.recent = collections.deque(maxlen=self.WINDOW_STEPS)
        self.fixed, self.step_seconds, self.replanned_at, self.checked_at = resuming, None, -math.inf, -math.inf
        if resuming:
            return schedule
        if schedule.decay_lr and schedule.warmup_iters < self.MIN_LAST_TIMED_ITER:
            raise UserError(f"--max_minutes needs --warmup_iters of at least {self.MIN_LAST_TIMED_ITER}: the step time "
                            f"is measured during warm-up, before the decay's length is known")
        return replace(schedule, max_iters=self.UNMEASURED, lr_decay_iters=self.UNMEASURED)

    def evaluated(self, seconds):
        """An evaluation (with its checkpoint save) took this long."""
        if self.enabled:
            self.longest_eval = max(self.longest_eval, seconds)
            self.eval_seconds_since_step += seconds

    def saved_state(self):
        """What a checkpoint records of the budget beside the schedule: the seconds it has used."""
        if not self.enabled:
            return {}
        return {"budget_seconds_used": self.elapsed(), "budget_longest_eval": self.longest_eval}

    def after_step(self, iter_num, schedule):
        """Called after each step: times it, fixes the horizon, re-plans it, stops a run about to
        overrun. Returns (the schedule from here on, None or (event name, line to log))."""
        if not self.enabled:
            return schedule, None
        note, refusal = None, None
        if self.rank == 0:
            try:
                self._time_step()
                schedule, note = self._plan(iter_num, schedule)
            except UserError as error:  # the other ranks must hear of it, or they wait for rank 0 forever
                refusal = error
        if self.world_size > 1:
            schedule = self._rank0_decisions(schedule, refusal is not None)
        if refusal is not None:
            raise refusal
        return schedule, note

    def elapsed(self):
        return time.perf_counter() - self.start_time

    def _time_step(self):
        """Record the step just taken, its evaluation left out; the first ones pay for allocation and compiling."""
        self.steps_taken += 1
        if self.steps_taken < self.FIRST_TIMED_ITER:
            return
        hardware.synchronize(self.device)
        now = time.perf_counter()
        if self.last_step_end is not None:
            seconds = now - self.last_step_end - self.eval_seconds_since_step
            self.recent.append(seconds)
            if not self.fixed:
                self.step_durations.append(seconds)
        self.last_step_end, self.eval_seconds_since_step = now, 0.0

    def _plan(self, iter_num, schedule):
        """The schedule from here on, and what to log: the first plan, a re-plan, a stop, or nothing."""
        if not self.fixed:
            if self.step_durations and self._timing_done(iter_num, schedule):
                return self._first_plan(iter_num, schedule)
            return schedule, None
        elapsed = self.elapsed()
        if iter_num >= schedule.max_iters or elapsed - self.checked_at < self.CHECK_SHARE * self.seconds:
            return schedule, None
        self.checked_at = elapsed
        step_seconds = self._recent_step_seconds()
        if step_seconds is None:
            return schedule, None
        if elapsed + step_seconds + self.longest_eval > (1 + self.OVERRUN) * self.seconds:
            schedule = replace(schedule, max_iters=iter_num)  # the loop evaluates and saves at max_iters, then stops
            return schedule, ("time_budget_stop", f"time budget reached at iter {iter_num}, before the planned horizon: "
                                                  f"stopping with an evaluation, the decay unfinished")
        if elapsed - self.replanned_at < self.REPLAN_GAP * self.seconds:
            return schedule, None
        decay_from = max(iter_num, schedule.warmup_iters)  # before the warm-up's end the decay has not begun
        horizon = max(self._horizon(iter_num, self.seconds - elapsed, step_seconds), decay_from + 1)
        if abs(horizon - schedule.max_iters) * step_seconds <= self.DRIFT * self.seconds:
            return schedule, None
        previous, previous_seconds = schedule.max_iters, self.step_seconds
        schedule = replace(schedule, max_iters=horizon, lr_decay_iters=horizon, decay_from_iter=decay_from,
                           decay_from_progress=schedule.decay_progress(decay_from))
        self.step_seconds, self.replanned_at = step_seconds, elapsed
        was = f" (was {previous_seconds * 1000:.1f})" if previous_seconds else ""
        return schedule, ("time_budget_replan",
                          f"time budget re-planned at iter {iter_num}: {step_seconds * 1000:.1f} ms per step{was}, "
                          f"{self.seconds - elapsed:.1f} s left -> max_iters = lr_decay_iters = {horizon} (was {previous})")

    def _first_plan(self, iter_num, schedule):
        """The horizon from the timed warm-up: the last step whose training and evaluations fit."""
        step_seconds = self._step_seconds()
        horizon = self._horizon(iter_num, self.seconds - self.elapsed(), step_seconds)
        if horizon <= iter_num + 2:
            raise UserError(f"--max_minutes={schedule.max_minutes:g} leaves room for {horizon} steps of "
                            f"{step_seconds * 1000:.0f} ms, too few to warm up and decay; give more minutes")
        shortened = ""
        if horizon < 2 * schedule.warmup_iters:  # the warm-up would leave no room to decay: a tenth of the run
            schedule = replace(schedule, warmup_iters=max(iter_num, horizon // 10))
            shortened = f", warm-up shortened to {schedule.warmup_iters} steps"
        schedule = replace(schedule, max_iters=horizon, lr_decay_iters=horizon)
        self.fixed, self.step_seconds = True, step_seconds
        return schedule, ("time_budget", f"time budget {schedule.max_minutes:g} min: {step_seconds * 1000:.1f} ms per step, "
                                         f"{self.longest_eval:.1f} s per evaluation -> max_iters = lr_decay_iters = {horizon}{shortened}")

    def _rank0_decisions(self, schedule, refused):
        """Rank 0's schedule on every rank (rank 0 alone evaluates, so its clock decides)."""
        decided = torch.tensor([float(refused), *schedule.decisions().values()], dtype=torch.float64, device=self.device)
        dist.broadcast(decided, src=0)
        if decided[0].item() and self.rank != 0:
            raise UserError("rank 0 refused the time budget (its message says why)")
        values = decided[1:].tolist()
        schedule = replace(schedule, **{key: type(getattr(schedule, key))(value) for key, value in zip(DECISIONS, values)})
        self.fixed = schedule.max_iters < self.UNMEASURED  # may_save() asks every rank
        return schedule

    def _timing_done(self, iter_num, schedule):
        """Whether the steps timed so far fix the horizon: the warm-up is over (the next step's
        learning rate would depend on it), or timing it all would spend too much of the budget."""
        if iter_num < self.MIN_LAST_TIMED_ITER:
            return False
        return iter_num >= schedule.warmup_iters or self.elapsed() >= self.TIMING_SHARE * self.seconds

    def _step_seconds(self):
        """The mean of the timed steps, those PAUSED times the median or longer left out."""
        return _mean_unpaused(self.step_durations, self.PAUSED)

    def _recent_step_seconds(self):
        """The step time of the last WINDOW_SHARE of the budget (at least MIN_WINDOW_STEPS steps,
        paused ones left out), or None while fewer steps were timed."""
        window, seconds = [], 0.0
        for step in reversed(self.recent):
            if len(window) >= self.MIN_WINDOW_STEPS and seconds >= self.WINDOW_SHARE * self.seconds:
                break
            window.append(step)
            seconds += step
        if len(window) < self.MIN_WINDOW_STEPS:
            return None
        return _mean_unpaused(window, self.PAUSED)

    def _horizon(self, iter_num, seconds_left, step_seconds):
        """The last iteration whose steps and evaluations (every eval_interval and at the end) fit,
        below UNMEASURED; by bisection, since whether n more steps fit only turns from yes to no."""
        interval = self.eval_interval

        def fits(n_steps):
            horizon = iter_num + n_steps
            n_evals = horizon // interval - iter_num // interval + (horizon % interval != 0)
            return n_steps * step_seconds + n_evals * self.longest_eval <= seconds_left

        fitting = 0  # the most steps known to fit (none: the caller refuses the budget)
        most = min(max(0, int((seconds_left - self.longest_eval) / step_seconds)), self.UNMEASURED - 1 - iter_num)
        while fitting < most:
            middle = (fitting + most + 1) // 2
            if fits(middle):
                fitting = middle
            else:
                most = middle - 1
        return iter_num + fitting


def _mean_unpaused(durations, paused):
    """The mean of step durations, those `paused` times the median or longer left out."""
    limit = paused * statistics.median(durations)
    kept = [seconds for seconds in durations if seconds < limit] or durations
    return sum(kept) / len(kept)

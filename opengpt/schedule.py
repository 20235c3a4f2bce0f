"""How long a run trains and at what learning rate: the Schedule, and TimeBudget, which fits the
Schedule's horizon to --max_minutes from measured step time and returns the new Schedule."""
import math
import statistics
import time
from dataclasses import dataclass, fields, replace

import torch
import torch.distributed as dist

from opengpt import hardware
from opengpt.cli import UserError

HORIZON = ("max_iters", "lr_decay_iters", "warmup_iters")  # what a time budget decides
MAX_MINUTES = 525_600  # a year: a larger --max_minutes is a typo (1e12), not a plan


@dataclass(frozen=True)
class Schedule:
    """Linear warmup for warmup_iters, cosine decay to min_lr at lr_decay_iters, then min_lr
    (learning_rate throughout without decay_lr); training stops at max_iters. Its fields are the
    run's flags of the same names; a --max_minutes run's horizon is decided by TimeBudget, and
    checkpoints save it in their config as the run's flags (config | asdict(schedule))."""
    learning_rate: float
    min_lr: float
    decay_lr: bool
    warmup_iters: int
    lr_decay_iters: int
    max_iters: int
    max_minutes: float = 0.0  # the budget the horizon was fitted to; 0 = the horizon is the flags'

    @classmethod
    def from_config(cls, cfg):
        return cls(**{f.name: cfg[f.name] for f in fields(cls)})

    def learning_rate_at(self, it):
        if not self.decay_lr:
            return self.learning_rate
        if it < self.warmup_iters:
            return self.learning_rate * (it + 1) / (self.warmup_iters + 1)
        if it >= self.lr_decay_iters:
            return self.min_lr
        progress = (it - self.warmup_iters) / (self.lr_decay_iters - self.warmup_iters)
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + coeff * (self.learning_rate - self.min_lr)


class TimeBudget:
    """--max_minutes: the schedule's horizon from measured step time.

    The clock starts with the training loop (start(); the first evaluation counts). The steps from
    FIRST_TIMED_ITER to the end of the warm-up are timed (the first ones pay for allocation and
    compiling), or fewer if the warm-up would take more than TIMING_SHARE of the budget, but at
    least up to MIN_LAST_TIMED_ITER. They lie inside the warm-up, whose learning rates do not depend
    on the horizon, so the run follows exactly the schedule of a run told its horizon up front. Then
    max_iters = lr_decay_iters = the last step whose training and evaluations (each as long as the
    longest so far) still fit. The whole warm-up is timed, not a few steps, because a shared
    machine's step time drifts: a few steps timed at a quiet moment plan too many (the lab
    notebook, logs/README.md, has the runs that showed it). Each step is timed on its own, and one
    that took PAUSED times the median or longer is left out of the step time: the process was stopped
    (SIGSTOP, a suspended machine), not slow; the time it lost still counts as elapsed.
    The horizon is saved with the config in every checkpoint: a resumed run continues that schedule
    and does not measure again. Should the machine slow down later, the run stops at the budget
    with an evaluation, before its planned horizon (and says so)."""

    FIRST_TIMED_ITER, MIN_LAST_TIMED_ITER = 2, 12
    TIMING_SHARE = 0.05
    PAUSED = 10  # a timed step this many times the median was paused, not slow
    UNMEASURED = 10**9  # max_iters until the horizon is fixed: one no run reaches (horizons stay below it)

    def __init__(self, eval_interval, world_size, device):
        self.eval_interval, self.world_size, self.device = eval_interval, world_size, device
        self.enabled = False

    def start(self, schedule, resumed_config=None):
        """Start the clock; return the schedule the run starts with: a resumed --max_minutes run's
        saved horizon (no new measuring, no guard), with --max_minutes one no run reaches until
        after_step fixes it, else `schedule` itself."""
        if resumed_config and resumed_config.get("max_minutes") and resumed_config["max_iters"] < self.UNMEASURED:
            return replace(schedule, max_minutes=resumed_config["max_minutes"],
                           **{key: resumed_config[key] for key in HORIZON})
        self.seconds = schedule.max_minutes * 60
        self.enabled = self.seconds > 0
        if not self.enabled:
            return schedule
        if schedule.decay_lr and schedule.warmup_iters < self.MIN_LAST_TIMED_ITER:
            raise UserError(f"--max_minutes needs --warmup_iters of at least {self.MIN_LAST_TIMED_ITER}: the step time "
                            f"is measured during warm-up, before the decay's length is known")
        self.fixed = False
        self.start_time = time.perf_counter()
        self.longest_eval = self.eval_seconds_since_step = 0.0
        self.last_step_end, self.step_durations = None, []
        return replace(schedule, max_iters=self.UNMEASURED, lr_decay_iters=self.UNMEASURED)

    def evaluated(self, seconds):
        """An evaluation (with its checkpoint save) took this long."""
        if self.enabled:
            self.longest_eval = max(self.longest_eval, seconds)
            self.eval_seconds_since_step += seconds

    def after_step(self, iter_num, schedule):
        """Called after each step: times steps, fixes the horizon once, stops a run about to overrun.
        Returns (the schedule from here on, None or (event name, line to log))."""
        if not self.enabled:
            return schedule, None
        note = None
        if not self.fixed and iter_num >= self.FIRST_TIMED_ITER:
            hardware.synchronize(self.device)
            now = time.perf_counter()
            if self.last_step_end is not None:  # this step's own time, its evaluation left out
                self.step_durations.append(now - self.last_step_end - self.eval_seconds_since_step)
            self.last_step_end, self.eval_seconds_since_step = now, 0.0
        if not self.fixed and self.step_durations and self._timing_done(iter_num, schedule):
            step_seconds = self._step_seconds()
            horizon = self._horizon(iter_num, self.seconds - (now - self.start_time), step_seconds)
            if horizon <= iter_num + 2:
                raise UserError(f"--max_minutes={schedule.max_minutes:g} leaves room for {horizon} steps of "
                                f"{step_seconds * 1000:.0f} ms, too few to warm up and decay; give more minutes")
            shortened = ""
            if horizon < 2 * schedule.warmup_iters:  # the warm-up would leave no room to decay: a tenth of the run
                schedule = replace(schedule, warmup_iters=max(iter_num, horizon // 10))
                shortened = f", warm-up shortened to {schedule.warmup_iters} steps"
            schedule = replace(schedule, max_iters=horizon, lr_decay_iters=horizon)
            self.fixed, self.step_seconds = True, step_seconds
            note = ("time_budget", f"time budget {schedule.max_minutes:g} min: {step_seconds * 1000:.1f} ms per step, "
                                   f"{self.longest_eval:.1f} s per evaluation -> max_iters = lr_decay_iters = {horizon}{shortened}")
        elif self.fixed and self.elapsed() + self.step_seconds + self.longest_eval > self.seconds and iter_num < schedule.max_iters:
            schedule = replace(schedule, max_iters=iter_num)  # the loop evaluates and saves at max_iters, then stops
            note = ("time_budget_stop", f"time budget reached at iter {iter_num}, before the planned horizon: stopping with an evaluation")
        if self.world_size > 1:  # rank 0 alone evaluates, so its clock decides; all ranks must agree
            agreed = torch.tensor([getattr(schedule, key) for key in HORIZON], dtype=torch.float64, device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            schedule = replace(schedule, **dict(zip(HORIZON, map(int, agreed.tolist()))))
        return schedule, note

    def elapsed(self):
        return time.perf_counter() - self.start_time

    def _timing_done(self, iter_num, schedule):
        """Whether the steps timed so far fix the horizon: the warm-up is over (the next step's
        learning rate would depend on it), or timing it all would spend too much of the budget."""
        if iter_num < self.MIN_LAST_TIMED_ITER:
            return False
        return iter_num >= schedule.warmup_iters or self.elapsed() >= self.TIMING_SHARE * self.seconds

    def _step_seconds(self):
        """The mean of the timed steps, those PAUSED times the median or longer left out."""
        limit = self.PAUSED * statistics.median(self.step_durations)
        kept = [seconds for seconds in self.step_durations if seconds < limit] or self.step_durations
        return sum(kept) / len(kept)

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

"""Train a GPT on token files from prepare.py, with AdamW, SophiaG or Muon. One loop for all.

    python train.py config/train_tiny_zh_cpu.py
    python train.py config/train_tiny_zh_cpu.py --optimizer=sophiag --learning_rate=3e-4
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_small_sophiag.py

gradient_accumulation_steps is per process: tokens per optimizer step are
batch_size * block_size * gradient_accumulation_steps * world_size (printed at start).

Where to change what: DEFAULTS (every option); build_model (init_from); build_optimizer, and
optimizers.py for anything about one optimizer (its groups, its step's arguments, SophiaG's Hessian
pass); train_step (one optimizer step: micro-batches, clipping, skipping a non-finite step; bench.py
times this same function); log_training_step (what a log line holds); save_training_state (the
checkpoint); evaluate; main (the loop: learning rate, evaluation and checkpoints, steps, logging, stop).
"""
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from opengpt import checkpoint as ckpt
from opengpt import folder_lock
from opengpt import hardware
from opengpt import optimizers
from opengpt.cli import UserError, run
from configurator import parse_args
from opengpt.data import SAMPLINGS, TokenData, data_folder
from model import GPT, GPTConfig
from opengpt.run_log import RunLog
from opengpt.weight_average import WeightAverage

DEFAULTS = dict(
    # output and evaluation
    out_dir="out",
    eval_interval=2000,
    log_interval=1,
    eval_iters=200,  # batches per split in an evaluation
    val_full_split=False,  # evaluate val on every window of the split, whatever eval_iters says
    eval_only=False,
    always_save_checkpoint=True,  # save at every evaluation, not only when val loss improves
    ckpt_interval=0,  # also save every N iterations whatever the val loss (0 = off)
    keep_best_checkpoint=False,  # also keep ckpt_best.pt, the checkpoint with the best val loss
    init_from="scratch",  # scratch | resume | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a transformers folder
    overwrite_out_dir=False,  # let a new run replace the checkpoints of an earlier run in out_dir
    # logging
    wandb_log=False,
    wandb_project="open-gpt-training",
    wandb_run_name="run",
    tensorboard_log=False,
    # data
    dataset="zh_default",
    data_dir="",  # default data/<dataset>
    gradient_accumulation_steps=40,  # per process
    batch_size=12,
    block_size=1024,
    sampling="random",  # training windows: random (nanoGPT's: each start drawn anywhere) | epochs (data.ShuffledEpochs)
    # model
    n_layer=12,
    n_head=12,
    n_embd=768,
    dropout=0.0,
    bias=False,
    scale_attn_by_inverse_layer_idx=False,
    rotary=False,  # rotary position embeddings instead of learned ones (export.py writes such a model as GPT-NeoX)
    activation="gelu_new",  # the MLP's: gelu_new (GPT-2's tanh GELU) or relu2 (ReLU squared)
    # optimizer
    optimizer="adamw",  # adamw | sophiag | muon
    learning_rate=6e-4,
    max_iters=600000,
    weight_decay=1e-1,
    beta1=0.9,
    beta2=0.95,
    muon_momentum=0.95,  # Muon's (Nesterov) momentum on the hidden matrices; AdamW's part keeps beta1, beta2
    grad_clip=1.0,  # 0 = no clipping
    rho=0.04,  # SophiaG's clipping threshold scale
    hess_interval=10,  # SophiaG: update the Hessian EMA every k steps; 0 = never (sign momentum)
    hess_accumulation_steps=0,  # micro-batches per process in a Hessian estimate; 0 = gradient_accumulation_steps, as the authors
    ema_decay=0.0,  # > 0: evaluate and save a moving average of the weights (weight_average.py); 0 = off
    decay_embeddings=True,  # weight decay on wte (shared with the head) and wpe too, as nanoGPT; the Sophia authors: False
    # learning-rate schedule: linear warmup, then cosine decay to min_lr at lr_decay_iters
    decay_lr=True,
    warmup_iters=2000,
    lr_decay_iters=600000,
    min_lr=6e-5,
    # train for a wall-clock budget: after a few warm-up steps the step time is measured and
    # max_iters = lr_decay_iters are set so that warm-up, decay and evaluations end inside it (0 = off)
    max_minutes=0.0,
    # faults
    max_bad_steps=10,  # stop after this many consecutive steps with a non-finite loss or gradient
    # system
    backend="auto",  # DDP backend: nccl on CUDA, gloo otherwise
    device="auto",  # auto | cpu | cuda | cuda:N | mps
    dtype="auto",  # auto | float32 | bfloat16 | float16
    compile=False,
    chunked_head_loss=True,  # False: nanoGPT's full logits + F.cross_entropy (the reference path; more memory)
    seed=1337,
)


def learning_rate_at(it, cfg):
    """Linear warmup for warmup_iters, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not cfg["decay_lr"]:
        return cfg["learning_rate"]
    if it < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (it + 1) / (cfg["warmup_iters"] + 1)
    if it >= cfg["lr_decay_iters"]:
        return cfg["min_lr"]
    progress = (it - cfg["warmup_iters"]) / (cfg["lr_decay_iters"] - cfg["warmup_iters"])
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg["min_lr"] + coeff * (cfg["learning_rate"] - cfg["min_lr"])


def check_config(cfg):
    try:  # the model's own fields: GPTConfig checks them (its messages name the field)
        GPTConfig(**model_args_from(cfg, vocab_size=1))
    except ValueError as e:
        raise UserError(f"--{e}") from None
    positive = ("batch_size", "gradient_accumulation_steps", "log_interval", "eval_interval", "eval_iters", "max_bad_steps")
    for key in positive:
        if cfg[key] <= 0:
            raise UserError(f"--{key} must be positive, got {cfg[key]}")
    for key in ("max_iters", "warmup_iters", "ckpt_interval", "hess_interval", "hess_accumulation_steps", "lr_decay_iters"):
        if cfg[key] < 0:
            raise UserError(f"--{key} must be zero or positive, got {cfg[key]}")
    if cfg["optimizer"] not in optimizers.REGISTRY:
        raise UserError(f"unknown --optimizer={cfg['optimizer']}; choose {optimizers.choices()}")
    if cfg["decay_lr"] and cfg["lr_decay_iters"] <= cfg["warmup_iters"]:
        raise UserError(f"--lr_decay_iters ({cfg['lr_decay_iters']}) must exceed --warmup_iters ({cfg['warmup_iters']})")
    if cfg["learning_rate"] <= 0 or cfg["min_lr"] < 0:
        raise UserError("--learning_rate must be positive and --min_lr zero or positive")
    if cfg["sampling"] not in SAMPLINGS:
        raise UserError(f"--sampling must be one of {', '.join(SAMPLINGS)}, got {cfg['sampling']}")
    for key in ("beta1", "beta2", "muon_momentum", "ema_decay"):
        if not 0.0 <= cfg[key] < 1.0:
            raise UserError(f"--{key} must be in [0, 1), got {cfg[key]}")
    for key in ("grad_clip", "weight_decay", "rho"):
        if not cfg[key] >= 0:  # written so that nan fails too
            raise UserError(f"--{key} must be zero or positive, got {cfg[key]}")
    if not 0 <= cfg["seed"] < 2**31:  # numpy takes seeds below 2**32, and each rank adds its rank
        raise UserError(f"--seed must be between 0 and {2**31 - 1}, got {cfg['seed']}")


# What a checkpoint fixes: the model's shape, and the optimizer whose state (hyperparameters included:
# load_state_dict restores them) it holds. A resumed run must be given the same values.
CHECKPOINT_SHAPE = ("n_layer", "n_head", "n_embd", "block_size", "bias", "scale_attn_by_inverse_layer_idx", "rotary",
                    "activation")
CHECKPOINT_OPTIMIZER = ("optimizer", "beta1", "beta2", "weight_decay", "decay_embeddings")


def check_resume_matches(cfg, checkpoint, path):
    """A one-line error listing every value the checkpoint fixes that the command line changed."""
    saved = {key: checkpoint["model_args"][key] for key in CHECKPOINT_SHAPE if key in checkpoint["model_args"]}
    saved_config = checkpoint.get("config") or {}
    keys = CHECKPOINT_OPTIMIZER + {"sophiag": ("rho",), "muon": ("muon_momentum",)}.get(cfg["optimizer"], ())
    saved |= {key: saved_config[key] for key in keys if saved_config.get(key) is not None}
    differing = [key for key, value in saved.items() if cfg[key] != value]
    if differing:
        theirs = ", ".join(f"{key} {saved[key]}" for key in differing)
        fix = " ".join(f"--{key}={saved[key]}" for key in differing)
        raise UserError(f"the checkpoint {path} was trained with {theirs}, which a resumed run cannot change; "
                        f"pass {fix} (the run's own command plus --init_from=resume), or start a new run in another --out_dir")


def make_out_dir(out_dir):
    if not out_dir:
        raise UserError("--out_dir is empty; name a folder, e.g. --out_dir=out")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out_dir={out_dir} is an existing file, not a folder; choose another name")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out_dir={out_dir}: {e.strerror or e}") from None


def claim_out_dir(cfg):
    """Make out_dir, lock it for this run (rank 0 only), and refuse to let a new run overwrite the
    checkpoint of an earlier one unless --overwrite_out_dir=True. Returns the lock: keep it."""
    out_dir = cfg["out_dir"]
    make_out_dir(out_dir)
    try:
        lock = folder_lock.FolderLock(out_dir, "train.py", inside=True)
    except OSError as e:  # a read-only or full filesystem, no permission
        raise UserError(f"cannot write in --out_dir={out_dir}: {e.strerror or e}") from None
    if cfg["init_from"] != "resume":
        saved = [name for name in (ckpt.FILENAME, ckpt.BEST_FILENAME) if os.path.exists(os.path.join(out_dir, name))]
        if saved and not cfg["overwrite_out_dir"]:
            lock.release()
            raise UserError(f"{out_dir} holds the checkpoint of an earlier run ({saved[0]}); continue it with "
                            f"--init_from=resume, or start over with --overwrite_out_dir=True")
        for name in saved:  # so that a resume after a crash can never pick up the earlier run's state
            os.remove(os.path.join(out_dir, name))
    return lock


def setup_distributed(backend, device):
    """(rank, local_rank, world_size); initialises the process group under torchrun."""
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 0, 1
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda:") and world_size > 1:
        # every process would train on that one GPU: each process's GPU is cuda:LOCAL_RANK
        raise UserError(f"--device={device} names one GPU, but under torchrun each process takes cuda:LOCAL_RANK; "
                        f"pass --device=cuda (pick the GPUs with CUDA_VISIBLE_DEVICES)")
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return rank, local_rank, world_size


def stream_seed(seed, stream):
    """The seed of a random stream of its own for the run seeded `seed`: not a shifted copy of
    another stream, as seed + 1 would be of the next run's."""
    return int(np.random.SeedSequence([seed % 2**63, *stream.encode()]).generate_state(1, np.uint64)[0] >> 1)


class TimeBudget:
    """--max_minutes: the schedule's horizon from measured step time.

    The clock starts with the training loop (the first evaluation counts). The steps from
    FIRST_TIMED_ITER to the end of the warm-up are timed (the first ones pay for allocation and
    compiling), or fewer if the warm-up would take more than TIMING_SHARE of the budget, but at
    least up to MIN_LAST_TIMED_ITER. They lie inside the warm-up, whose learning rates do not depend
    on the horizon, so the run follows exactly the schedule of a run told its horizon up front. Then
    max_iters = lr_decay_iters = the last step whose training and evaluations (each as long as the
    longest so far) still fit. Timing the whole warm-up, not a few steps, matters on a shared
    machine: ten steps timed at a quiet moment once planned 2,730 steps of 217 ms where 252 ms was
    the average, and another run left 8% of its budget unused.
    The horizon is saved with the config in every checkpoint: a resumed run continues that schedule
    and does not measure again. Should the machine slow down later, the run stops at the budget
    with an evaluation, before its planned horizon (and says so)."""

    FIRST_TIMED_ITER, MIN_LAST_TIMED_ITER = 2, 12
    TIMING_SHARE = 0.05
    UNMEASURED = 10**9  # max_iters until the horizon is fixed: one no run reaches

    def __init__(self, cfg, iter_num, resumed_config, world_size, device):
        self.cfg, self.world_size, self.device = cfg, world_size, device
        self.enabled = False
        if resumed_config and resumed_config.get("max_minutes") and resumed_config["max_iters"] < self.UNMEASURED:
            for key in ("max_iters", "lr_decay_iters", "warmup_iters"):
                cfg[key] = resumed_config[key]
            cfg["max_minutes"] = resumed_config["max_minutes"]
            return  # the horizon was fixed before the checkpoint: keep it, no new measuring, no guard
        self.seconds = cfg["max_minutes"] * 60
        self.enabled = self.seconds > 0
        if not self.enabled:
            return
        if cfg["decay_lr"] and cfg["warmup_iters"] < self.MIN_LAST_TIMED_ITER:
            raise UserError(f"--max_minutes needs --warmup_iters of at least {self.MIN_LAST_TIMED_ITER}: the step time "
                            f"is measured during warm-up, before the decay's length is known")
        cfg["max_iters"] = cfg["lr_decay_iters"] = self.UNMEASURED
        self.fixed = False
        self.start = time.perf_counter()
        self.longest_eval = self.eval_seconds_since_timing = 0.0
        self.timing_start = self.timing_iter = None

    def evaluated(self, seconds):
        """An evaluation (with its checkpoint save) took this long."""
        if self.enabled:
            self.longest_eval = max(self.longest_eval, seconds)
            self.eval_seconds_since_timing += seconds

    def after_step(self, iter_num):
        """Called after each step: times steps, fixes the horizon once, stops a run about to overrun.
        Returns (event name, line to log), or None."""
        if not self.enabled:
            return None
        note = None
        if not self.fixed and self.timing_start is None and iter_num >= self.FIRST_TIMED_ITER:
            hardware.synchronize(self.device)
            self.timing_start, self.timing_iter, self.eval_seconds_since_timing = time.perf_counter(), iter_num, 0.0
        elif not self.fixed and self.timing_start is not None and self._timing_done(iter_num):
            hardware.synchronize(self.device)
            now = time.perf_counter()
            step_seconds = (now - self.timing_start - self.eval_seconds_since_timing) / (iter_num - self.timing_iter)
            horizon = self._horizon(iter_num, self.seconds - (now - self.start), step_seconds)
            if horizon <= iter_num + 2:
                raise UserError(f"--max_minutes={self.cfg['max_minutes']:g} leaves room for {horizon} steps of "
                                f"{step_seconds * 1000:.0f} ms, too few to warm up and decay; give more minutes")
            shortened = ""
            if horizon < 2 * self.cfg["warmup_iters"]:  # the warm-up would leave no room to decay: a tenth of the run
                self.cfg["warmup_iters"] = max(iter_num, horizon // 10)
                shortened = f", warm-up shortened to {self.cfg['warmup_iters']} steps"
            self.cfg["max_iters"] = self.cfg["lr_decay_iters"] = horizon
            self.fixed, self.step_seconds = True, step_seconds
            note = ("time_budget", f"time budget {self.cfg['max_minutes']:g} min: {step_seconds * 1000:.1f} ms per step, "
                                   f"{self.longest_eval:.1f} s per evaluation -> max_iters = lr_decay_iters = {horizon}{shortened}")
        elif self.fixed and self.elapsed() + self.step_seconds + self.longest_eval > self.seconds and iter_num < self.cfg["max_iters"]:
            self.cfg["max_iters"] = iter_num  # the loop evaluates and saves at max_iters, then stops
            note = ("time_budget_stop", f"time budget reached at iter {iter_num}, before the planned horizon: stopping with an evaluation")
        if self.world_size > 1:  # rank 0 alone evaluates, so its clock decides; all ranks must agree
            keys = ("max_iters", "lr_decay_iters", "warmup_iters")
            agreed = torch.tensor([self.cfg[key] for key in keys], dtype=torch.float64, device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            self.cfg.update(zip(keys, map(int, agreed.tolist())))
        return note

    def elapsed(self):
        return time.perf_counter() - self.start

    def _timing_done(self, iter_num):
        """Whether the steps timed so far fix the horizon: the warm-up is over (the next step's
        learning rate would depend on it), or timing it all would spend too much of the budget."""
        if iter_num < self.MIN_LAST_TIMED_ITER:
            return False
        return iter_num >= self.cfg["warmup_iters"] or self.elapsed() >= self.TIMING_SHARE * self.seconds

    def _horizon(self, iter_num, seconds_left, step_seconds):
        """The last iteration whose steps and evaluations (every eval_interval and at the end) fit."""
        interval = self.cfg["eval_interval"]
        n_steps = max(0, int((seconds_left - self.longest_eval) / step_seconds))
        while n_steps > 0:
            horizon = iter_num + n_steps
            n_evals = horizon // interval - iter_num // interval + (horizon % interval != 0)
            if n_steps * step_seconds + n_evals * self.longest_eval <= seconds_left:
                return horizon
            n_steps -= max(1, int(self.longest_eval / step_seconds))
        return iter_num


class StopRequest:
    """Remembers SIGTERM/SIGINT so the loop can checkpoint at the next step boundary and exit."""

    def __init__(self):
        self.signal_name = None
        self.signum = None
        self.stopped = False  # set when the loop stops for a signal, this process's or another rank's
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal_name is not None:  # a second signal: the user means it
            raise KeyboardInterrupt
        self.signum, self.signal_name = signum, signal.Signals(signum).name

    def exit_status(self):
        """128 + the signal's number, as a shell reports a process a signal ended: 130 for SIGINT
        (Ctrl-C), 143 for SIGTERM; 143 on a rank that stopped because another rank was signalled."""
        return 128 + (self.signum or signal.SIGTERM)


def model_args_from(cfg, vocab_size):
    """GPTConfig's fields as the run's flags set them, for a model of vocab_size (already padded)."""
    return dict(n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"], block_size=cfg["block_size"],
                bias=cfg["bias"], vocab_size=vocab_size, dropout=cfg["dropout"],
                scale_attn_by_inverse_layer_idx=cfg["scale_attn_by_inverse_layer_idx"], rotary=cfg["rotary"],
                activation=cfg["activation"])


def build_model(cfg, data, data_dir, tokenizer):
    """(model, model_args, checkpoint): the GPT that init_from names, on the CPU; the checkpoint
    when resuming (its optimizer and random states are restored later), else None."""
    checkpoint = None
    model_args = model_args_from(cfg, data.padded_vocab_size)
    if cfg["init_from"] == "scratch":
        model = GPT(GPTConfig(**model_args))
    elif cfg["init_from"] == "resume":
        checkpoint_path = os.path.join(cfg["out_dir"], ckpt.FILENAME)
        checkpoint = ckpt.load(checkpoint_path)
        ckpt.check_same_tokenizer(checkpoint, tokenizer, data_dir)
        check_resume_matches(cfg, checkpoint, checkpoint_path)
        model_args = checkpoint["model_args"] | {"dropout": cfg["dropout"]}
        model = ckpt.model_from(checkpoint, cfg["dropout"])
    else:
        ckpt.check_gpt2_tokenizer(cfg["init_from"], tokenizer, data_dir)
        model = ckpt.gpt2_model(cfg["init_from"], cfg["dropout"])
        if cfg["block_size"] > model.config.block_size:
            raise UserError(f"--block_size={cfg['block_size']} exceeds {cfg['init_from']}'s {model.config.block_size}")
        model.crop_block_size(cfg["block_size"])
        model_args = {k: getattr(model.config, k) for k in model_args}
        cfg |= {key: model_args[key] for key in CHECKPOINT_SHAPE}  # the log records GPT-2's shape, not our defaults
    if model.config.vocab_size < data.vocab_size:
        raise UserError(f"the model's vocabulary ({model.config.vocab_size}) is smaller than the data's ({data.vocab_size})")
    model.chunked_head_loss = cfg["chunked_head_loss"]
    return model, model_args, checkpoint


def start_weight_average(cfg, model, checkpoint, is_master):
    """The run's WeightAverage (rank 0 only, with ema_decay > 0), after putting the weights to go on
    training from in the model: a checkpoint saved with an average holds it as "model", which
    build_model loaded, and the trained weights as "trained_model"."""
    average = WeightAverage(model, cfg["ema_decay"]) if cfg["ema_decay"] and is_master else None
    if checkpoint is not None and "trained_model" in checkpoint:
        ckpt.load_model_state(model, checkpoint, "trained_model")
        if average is not None:
            average.updates = checkpoint["weight_average_updates"]
    return average


def build_optimizer(cfg, model, device_type):
    """The optimizer --optimizer names, over the model's parameters: see optimizers.py."""
    return optimizers.REGISTRY[cfg["optimizer"]].build(model, cfg, device_type)


@dataclass
class Training:
    """What one optimizer step touches. main() builds it once; bench.py builds one to time train_step."""
    cfg: dict
    model: torch.nn.Module  # what forward runs: the GPT, compiled and/or wrapped in DDP
    raw_model: torch.nn.Module  # the GPT itself: its parameters, checkpoints, evaluation
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: object  # a context manager: torch.autocast or nullcontext
    data: object  # TokenData, or anything with its train_micro_batches() and vocab_size
    device: str
    rank: int
    world_size: int
    batch_generator: torch.Generator  # the training windows, the same on every rank (data.py)
    hessian_generator: torch.Generator  # the Hessian pass's windows and labels, also the same on every rank
    weight_average: WeightAverage = None  # with ema_decay > 0, on rank 0: what evaluations measure and checkpoints save
    pass_statistics: dict = field(default_factory=dict)  # of the optimizer's last pass after a step, to log

    @property
    def spec(self):
        return optimizers.REGISTRY[self.cfg["optimizer"]]

    @property
    def tokens_per_step(self):
        return self.cfg["batch_size"] * self.cfg["block_size"] * self.cfg["gradient_accumulation_steps"] * self.world_size

    def micro_batches(self, generator, count):
        """This rank's `count` micro-batches of a step, drawn with generator, on the device."""
        xs, ys = self.data.train_micro_batches(generator, self.cfg["batch_size"], count, self.rank, self.world_size)
        if self.device.startswith("cuda"):  # a copy from pageable memory is synchronous, non_blocking or not
            xs, ys = [x.pin_memory() for x in xs], [y.pin_memory() for y in ys]
        return [(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)) for x, y in zip(xs, ys)]

    def sync_context(self, micro_step, count):
        """DDP all-reduces gradients only on the last micro-step; the others accumulate locally."""
        if self.world_size > 1 and micro_step < count - 1:
            return self.model.no_sync()
        return nullcontext()

    def accumulate_gradients(self, batches, label_seeds=None):
        """Forward and backward over the micro-batches, each loss divided by their number, so .grad
        holds the gradient of their mean loss (scaled by the GradScaler, if on). With label_seeds (one
        per micro-batch) the loss is on labels drawn from the model's own softmax instead of y: the
        Gauss-Newton-Bartlett loss of SophiaG's Hessian pass. Returns the mean loss, detached."""
        count = len(batches)
        loss_sum = torch.zeros((), device=self.device)
        for micro_step, (x, y) in enumerate(batches):
            with self.sync_context(micro_step, count), self.autocast:
                if label_seeds is None:
                    _, loss = self.model(x, y)
                else:
                    label_generator = torch.Generator(self.device).manual_seed(label_seeds[micro_step])
                    _, loss = self.model(x, None, sample_labels_from_vocab=self.data.vocab_size, label_generator=label_generator)
                loss = loss / count  # the gradient of the mean over micro-batches
            loss_sum += loss.detach()
            self.scaler.scale(loss).backward()
        return loss_sum


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's mean loss over the step's micro-batches, on the device
    grad_norm: torch.Tensor  # before clipping; zero when clipping is off
    faulty: bool  # the loss or gradient was not finite (a float16 overflow the GradScaler handles is not a fault)
    stop: bool = False  # some rank was asked to stop (SIGTERM/SIGINT): every rank knows it at the same step


def train_step(t, iter_num, track_stats=False, stop_requested=False):
    """One optimizer step, iteration iter_num: forward and backward over gradient_accumulation_steps
    micro-batches, gradient clipping, the step itself unless the loss or gradient is not finite, then
    the optimizer's pass after the step (SophiaG's Hessian estimate every hess_interval steps).
    track_stats: record the optimizer's statistics for the log. stop_requested: this process was
    asked to stop; StepResult.stop says whether any was. bench.py times this function."""
    loss = t.accumulate_gradients(t.micro_batches(t.batch_generator, t.cfg["gradient_accumulation_steps"]))
    if t.cfg["grad_clip"] > 0:
        t.scaler.unscale_(t.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(t.raw_model.parameters(), t.cfg["grad_clip"])
    else:
        grad_norm = torch.zeros((), device=t.device)
    # Every rank must agree to skip, or one would step while another waits; a stop request travels in
    # the same all-reduce (as 1 - stop under MIN), and the host waits for the device once for all three.
    flags = torch.stack([torch.isfinite(loss), torch.isfinite(grad_norm),
                         torch.full((), not stop_requested, device=t.device)]).float()
    if t.world_size > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    loss_is_finite, grad_is_finite, nobody_stops = (bool(flag) for flag in flags.tolist())
    step_is_finite = loss_is_finite and grad_is_finite
    if step_is_finite or t.scaler.is_enabled():
        # with fp16 the GradScaler skips steps whose gradients overflowed and lowers its scale;
        # that is routine, not a fault
        t.spec.before_step(t.optimizer, track_stats)
        t.scaler.step(t.optimizer, **t.spec.step_kwargs(t.tokens_per_step))
        t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    t.pass_statistics.update(t.spec.after_step(t, iter_num))
    return StepResult(loss, grad_norm, faulty=not (step_is_finite or (t.scaler.is_enabled() and loss_is_finite)),
                      stop=not nobody_stops)


class StepClock:
    """Seconds per iteration between log lines, evaluation time left out."""

    def __init__(self):
        self.restart()

    def restart(self):
        self.start, self.iterations = time.perf_counter(), 0

    def count_iteration(self):
        self.iterations += 1

    def lap(self):
        """Seconds per iteration since the last lap (or restart), and start a new lap."""
        now = time.perf_counter()
        seconds = (now - self.start) / self.iterations
        self.start, self.iterations = now, 0
        return seconds


def log_training_step(t, log, iter_num, lr, step, seconds, total_bad_steps, peak):
    """The train event in metrics.jsonl and the text line: loss, speed, and the optimizer's statistics."""
    if t.world_size > 1:
        dist.all_reduce(step.loss, op=dist.ReduceOp.AVG)
    if t.rank != 0:
        return
    # MFU of one process: its own share of the step's tokens against its own device's peak
    flops = t.raw_model.flops_per_token() * t.tokens_per_step / t.world_size / seconds
    stats = t.spec.statistics(t.optimizer) | {k: float(v) for k, v in t.pass_statistics.items()}
    fields = dict(iter=iter_num, loss=step.loss.item(), lr=lr, time_ms=seconds * 1000,
                  tokens_per_sec=t.tokens_per_step / seconds, mfu=flops / peak if peak else None,
                  grad_norm=float(step.grad_norm), bad_steps=total_bad_steps, **stats)
    log.event("train", **fields)
    mfu = f"{fields['mfu'] * 100:.2f}%" if peak else "n/a"
    log.text(f"iter {iter_num}: loss {fields['loss']:.4f}, time {seconds * 1000:.2f}ms, mfu {mfu}{t.spec.log_text(stats)}")


def save_training_state(t, model_args, iter_num, best_val_loss, tokenizer, file_name, log):
    """Write out_dir/file_name: everything --init_from=resume needs to continue exactly."""
    state = ckpt.training_state(t.raw_model, t.optimizer, t.scaler, model_args, iter_num, best_val_loss, t.cfg,
                                t.batch_generator, tokenizer, t.hessian_generator, t.data.epochs, t.weight_average)
    ckpt.save(state, os.path.join(t.cfg["out_dir"], file_name))
    log.text(f"saved checkpoint {t.cfg['out_dir']}/{file_name} at iter {iter_num}")


def main():
    cfg = parse_args(DEFAULTS, sys.argv[1:])
    check_config(cfg)
    device = hardware.pick_device(cfg["device"])
    rank, local_rank, world_size = setup_distributed(cfg["backend"], device)
    is_master = rank == 0
    if device == "cuda" and world_size > 1:
        device = f"cuda:{local_rank}"
    device_type = device.split(":")[0]
    dtype = hardware.pick_dtype(cfg["dtype"], device)
    hardware.allow_tf32(device)
    if device_type == "cpu":
        hardware.keep_freed_memory()
    if cfg["compile"]:
        hardware.check_compile_works(device)

    data_dir = data_folder(cfg)
    data = TokenData(data_dir, cfg["block_size"], cfg["sampling"])
    tokenizer = data.load_tokenizer()
    token_byte_lengths = torch.from_numpy(tokenizer.token_byte_lengths)

    random.seed(cfg["seed"] + rank)
    np.random.seed(cfg["seed"] + rank)
    torch.manual_seed(cfg["seed"] + rank)
    batch_generator = torch.Generator().manual_seed(cfg["seed"])  # same on every rank: see data.py
    # SophiaG's Hessian pass draws its windows and labels from a stream of its own (also the same
    # on every rank), so the training batches do not depend on the optimizer: same-seed runs of
    # different optimizers train on the same batches, and seeds are paired across them.
    hessian_generator = torch.Generator().manual_seed(stream_seed(cfg["seed"], "hessian"))

    model, model_args, checkpoint = build_model(cfg, data, data_dir, tokenizer)
    iter_num, best_val_loss = (checkpoint["iter_num"], checkpoint["best_val_loss"]) if checkpoint else (0, float("inf"))
    resumed_config = checkpoint["config"] if checkpoint else None
    out_dir_lock = claim_out_dir(cfg) if is_master else None
    model.to(device)
    weight_average = start_weight_average(cfg, model, checkpoint, is_master)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    optimizer = build_optimizer(cfg, model, device_type)
    if checkpoint is not None:
        ckpt.restore_training_state(checkpoint, optimizer, scaler, batch_generator, hessian_generator, rank, data.epochs)
        checkpoint = None  # free the memory

    raw_model = model
    if cfg["compile"]:
        model = torch.compile(model)
    if world_size > 1:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
    t = Training(cfg=cfg, model=model, raw_model=raw_model, optimizer=optimizer, scaler=scaler,
                 autocast=hardware.autocast_context(device, dtype), data=data, device=device, rank=rank,
                 world_size=world_size, batch_generator=batch_generator, hessian_generator=hessian_generator,
                 weight_average=weight_average)
    log = RunLog(cfg, is_master, machine=hardware.device_name(device))
    stop = StopRequest()

    if is_master:
        log.text(f"tokens per optimizer step: {t.tokens_per_step:,} = {cfg['batch_size']} batch x {cfg['block_size']} block "
                 f"x {cfg['gradient_accumulation_steps']} accumulation x {world_size} processes")
        log.text(f"model: {raw_model.get_num_params() / 1e6:.2f}M parameters, {cfg['optimizer']} optimizer, "
                 f"device {device} ({hardware.device_name(device)}), dtype {dtype}")
        if t.spec.describe(cfg):
            log.text(t.spec.describe(cfg))
        if data.epochs:
            log.text(f"training windows: the train split's {data.epochs.windows_per_epoch:,} windows in a new "
                     f"random order every epoch (sampling=epochs)")
        if weight_average:
            log.text(f"evaluating and saving a moving average of the weights (ema_decay={cfg['ema_decay']})")
    peak, peak_source = hardware.peak_flops(device, dtype) if is_master else (None, "")
    log.event("peak_flops", flops=peak, source=peak_source)

    last_saved_iter = iter_num if cfg["init_from"] == "resume" else None

    def save_checkpoint(file_name):
        nonlocal last_saved_iter
        save_training_state(t, model_args, iter_num, best_val_loss, tokenizer, file_name, log)
        if file_name == ckpt.FILENAME:
            last_saved_iter = iter_num

    budget = TimeBudget(cfg, iter_num, resumed_config, world_size, device)
    bad_steps, total_bad_steps = 0, 0
    clock = StepClock()
    while True:
        lr = learning_rate_at(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        if (iter_num % cfg["eval_interval"] == 0 or iter_num == cfg["max_iters"]) and is_master:
            t_eval = time.perf_counter()
            with weight_average.swapped_in(raw_model) if weight_average else nullcontext():
                metrics = evaluate(raw_model, data, cfg, device, t.autocast, token_byte_lengths)
            train, val = metrics["train"], metrics["val"]
            log.event("eval", iter=iter_num, train_loss=train["loss"], val_loss=val["loss"], train_bpc=train["bpc"],
                      val_bpc=val["bpc"], val_bpb=val["bpb"], lr=lr)
            log.text(f"step {iter_num}: train loss {train['loss']:.4f}, val loss {val['loss']:.4f}, "
                     f"val {val['bpc']:.3f} bits/char ({val['bpb']:.3f} bits/byte)")
            if val["loss"] < best_val_loss:
                best_val_loss = val["loss"]
                if iter_num > 0 and cfg["keep_best_checkpoint"]:
                    save_checkpoint(ckpt.BEST_FILENAME)
            if iter_num > 0 and (cfg["always_save_checkpoint"] or val["loss"] <= best_val_loss):
                save_checkpoint(ckpt.FILENAME)
            budget.evaluated(time.perf_counter() - t_eval)
            clock.restart()  # evaluation time is not training time
        if cfg["eval_only"] or iter_num >= cfg["max_iters"]:
            break

        log_due = iter_num % cfg["log_interval"] == 0
        step = train_step(t, iter_num, track_stats=log_due and is_master, stop_requested=stop.signal_name is not None)
        if step.faulty:
            bad_steps += 1
            total_bad_steps += 1
            log.text(f"iter {iter_num}: non-finite loss or gradient, step skipped ({bad_steps} in a row)")
            if bad_steps >= cfg["max_bad_steps"]:
                raise UserError(diverged_message(bad_steps, iter_num, last_saved_iter, cfg, dtype))
        else:
            bad_steps = 0
            if weight_average:
                weight_average.update(raw_model)
        clock.count_iteration()
        iter_num += 1
        budget_note = budget.after_step(iter_num)
        if budget_note:
            event, line = budget_note
            log.text(line)
            log.event(event, iter=iter_num, max_iters=cfg["max_iters"], lr_decay_iters=cfg["lr_decay_iters"])
        if log_due:
            log_training_step(t, log, iter_num - 1, lr, step, clock.lap(), total_bad_steps, peak)

        if step.stop:
            stop.stopped = True
            if is_master:
                save_checkpoint(ckpt.FILENAME)
                log.text(f"received {stop.signal_name or 'a stop request'}: stopping with exit status {stop.exit_status()}; "
                         f"continue with the same command plus --init_from=resume")
            break
        if cfg["ckpt_interval"] and iter_num % cfg["ckpt_interval"] == 0 and is_master:
            save_checkpoint(ckpt.FILENAME)

    if budget.enabled:
        log.event("time_budget_end", iter=iter_num, elapsed_seconds=budget.elapsed(), budget_seconds=budget.seconds)
        log.text(f"trained for {budget.elapsed():.1f} s of the {budget.seconds:.0f} s budget")
    log.close()
    if is_master and peak:
        print(f"MFU is against {peak / 1e12:.2f} TFLOP/s ({peak_source})")
    elif is_master:
        print(f"MFU not reported: {peak_source}")
    if world_size > 1:
        # rank 0 may still be evaluating and saving: leave together, or a rank tearing down its
        # process group while a peer is busy can abort ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()
    if out_dir_lock is not None:
        out_dir_lock.release()
    if stop.stopped:
        # saved but not finished: a non-zero status, so `train.py && export.py` does not go on
        sys.exit(stop.exit_status())


def diverged_message(bad_steps, iter_num, last_saved_iter, cfg, dtype):
    """Why the run stopped, what is left in out_dir, and what to change; without claiming the
    checkpoint is good: the weights may have been diverging for a while before the loss broke."""
    if last_saved_iter is None:
        kept = "no checkpoint of this run was saved"
    else:
        kept = (f"the latest checkpoint, {cfg['out_dir']}/{ckpt.FILENAME} (iter {last_saved_iter}), holds no step with a "
                f"non-finite loss but may already be diverging: check the losses before it in metrics.jsonl")
    fix = "lower --learning_rate" + (f", or train in --dtype=float32 instead of {dtype}" if dtype != "float32" else "")
    return (f"{bad_steps} consecutive steps had a non-finite loss or gradient; stopped at iter {iter_num}; "
            f"{kept}; {fix}")


@torch.no_grad()
def evaluate(model, data, cfg, device, autocast, token_byte_lengths):
    """Per split: mean loss per token, and the same information as bits per UTF-8 byte and bits per
    character, which do not depend on the tokenizer. On eval_iters train batches (the same windows
    every time) and eval_iters batches of the val split's consecutive windows (all of them with
    val_full_split). Bits per byte are exact over the tokens evaluated (each target's byte length
    from the tokenizer); bits per character scale them by the split's bytes per character."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        loss_sum, n_tokens, n_bytes = 0.0, 0, 0
        n_batches = 0 if split == "val" and cfg["val_full_split"] else cfg["eval_iters"]
        for x, y in data.eval_batches(split, cfg["batch_size"], n_batches):
            with autocast:
                _, loss = model(x.to(device), y.to(device))
            loss_sum += loss.item() * y.numel()  # the last batch may be short: weight by tokens
            n_tokens += y.numel()
            n_bytes += int(token_byte_lengths[y].sum())
        bits_per_byte = loss_sum / math.log(2) / n_bytes
        out[split] = dict(loss=loss_sum / n_tokens, bpb=bits_per_byte, bpc=bits_per_byte * data.bytes_per_character(split))
    model.train()
    return out


if __name__ == "__main__":
    run(main)

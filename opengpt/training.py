"""What train.py's loop calls: one optimizer step (Training, train_step), evaluation, the log line of
a step, the checkpoint and the checks before it (finite weights, sane losses), the stop on a signal,
the message of a run that diverged and of one whose model or batches do not fit in memory. bench.py times the same train_step."""
import math
import os
import re
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from opengpt import checkpoint as ckpt
from opengpt import optimizers
from opengpt.cli import UserError
from opengpt.data import IGNORED_TARGET
from opengpt.weight_average import WeightAverage


@dataclass
class Training:
    """What one optimizer step touches. train.py builds it once; bench.py builds one to time train_step."""
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
    chat: dict = None  # what checkpoints record of a chat fine-tuning (run_setup.chat_record); None for other data
    pass_statistics: dict = field(default_factory=dict)  # of the optimizer's last pass after a step, to log
    hessian_grads: tuple = None  # (gradients, loss scale) of the Hessian loss a step computed, until the pass after it
    loss_scale: float = None  # the GradScaler's scale after the last step (float16): a lower one after a step is a skip

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

    def accumulate_gradients(self, batches, label_seeds=None, hessian_seeds=None):
        """Forward and backward over the micro-batches, each loss divided by their number, so .grad
        holds the gradient of their mean loss (scaled by the GradScaler, if on). With label_seeds (one
        per micro-batch) the loss is on labels drawn from the model's own softmax instead of y: the
        Gauss-Newton-Bartlett loss of SophiaG's Hessian pass. With hessian_seeds the same forward also
        draws those labels, and the gradient of their loss goes to self.hessian_grads (a second
        backward, this rank's, unsynced). Returns the mean loss, detached."""
        count = len(batches)
        loss_sum = torch.zeros((), device=self.device)
        params = list(self.raw_model.parameters()) if hessian_seeds is not None else None
        hessian_grads = None
        for micro_step, (x, y) in enumerate(batches):
            with self.sync_context(micro_step, count), self.autocast:
                seeds = label_seeds if label_seeds is not None else hessian_seeds
                generator = None if seeds is None else torch.Generator(self.device).manual_seed(seeds[micro_step])
                if hessian_seeds is not None:
                    _, loss, sampled_loss = self.model(x, y, sample_labels_from_vocab=self.data.vocab_size, label_generator=generator)
                elif label_seeds is not None:
                    _, loss = self.model(x, None, sample_labels_from_vocab=self.data.vocab_size, label_generator=generator)
                else:
                    _, loss = self.model(x, y)
                loss = loss / count  # the gradient of the mean over micro-batches
            if hessian_seeds is not None:  # before the training loss's backward, which frees the graph
                grads = torch.autograd.grad(self.scaler.scale(sampled_loss / count), params, retain_graph=True)
                hessian_grads = grads if hessian_grads is None else torch._foreach_add(hessian_grads, grads)
            loss_sum += loss.detach()
            self.scaler.scale(loss).backward()
        if hessian_grads is not None:
            self.hessian_grads = hessian_grads, self.scaler.get_scale() if self.scaler.is_enabled() else None
        return loss_sum


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's mean loss over the step's micro-batches, on the device
    grad_norm: torch.Tensor  # before clipping; zero when clipping is off
    faulty: bool  # the loss or gradient was not finite (in float16 not a skipped overflow that leaves the scale at 1 or more)
    stop: bool = False  # some rank was asked to stop (SIGTERM/SIGINT): every rank knows it at the same step


def train_step(t, iter_num, track_stats=False, stop_requested=False):
    """One optimizer step, iteration iter_num: forward and backward over gradient_accumulation_steps
    micro-batches, gradient clipping, the step itself unless the loss or gradient is not finite, then
    the optimizer's pass after the step (SophiaG's Hessian estimate every hess_interval steps).
    track_stats: record the optimizer's statistics for the log. stop_requested: this process was
    asked to stop; StepResult.stop says whether any was. bench.py times this function."""
    loss = t.accumulate_gradients(t.micro_batches(t.batch_generator, t.cfg["gradient_accumulation_steps"]),
                                  hessian_seeds=t.spec.hessian_seeds_in_step(t, iter_num))
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
    if t.scaler.is_enabled() and t.loss_scale is None:
        t.loss_scale = t.scaler.get_scale()  # once, before the first step (the device is idle after flags' wait)
    if step_is_finite or t.scaler.is_enabled():
        # with fp16 the GradScaler skips steps whose gradients overflowed and lowers its scale;
        # that is routine, not a fault
        t.spec.before_step(t.optimizer, track_stats)
        t.scaler.step(t.optimizer, **t.spec.step_kwargs(t.tokens_per_step))
        t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    t.pass_statistics.update(t.spec.after_step(t, iter_num))
    if t.scaler.is_enabled():
        # a skipped step (the scale lowered) is a fault once the scale is below 1: the gradients are then not
        # finite unscaled either (and without clipping grad_norm is no test of them); a step taken is none
        scale_before, t.loss_scale = t.loss_scale, t.scaler.get_scale()
        faulty = not loss_is_finite or t.loss_scale < min(scale_before, 1)
    else:
        faulty = not step_is_finite
    return StepResult(loss, grad_norm, faulty=faulty, stop=not nobody_stops)


@torch.no_grad()
def evaluate(model, data, cfg, device, autocast, token_byte_lengths):
    """Per split (evaluate_split): the loss, bits per byte and bits per character on eval_iters
    train batches (the same windows every time) and eval_iters batches of the val split's
    consecutive windows (all of them with val_full_split)."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        n_batches = 0 if split == "val" and cfg["val_full_split"] else cfg["eval_iters"]
        out[split] = evaluate_split(model, data, split, cfg["batch_size"], n_batches, device, autocast, token_byte_lengths)
    model.train()
    return out


@torch.no_grad()
def evaluate_split(model, data, split, batch_size, max_batches, device, autocast, token_byte_lengths):
    """Mean loss per target token, and the same information as bits per UTF-8 byte and bits per
    character, which do not depend on the tokenizer; targets the data leaves out (a chat folder's
    non-assistant tokens, -1) count nowhere. Bits per byte are exact over the targets evaluated (each
    one's byte length from the tokenizer); bits per character scale them by the split's bytes per
    character. Where the data records sources, "sources" holds the same numbers for each source's
    targets (each scaled by its own bytes per character); a source none of whose targets were
    evaluated is left out. The caller puts the model in eval mode."""
    names = data.source_names(split)
    n_buckets = max(len(names), 1)  # one bucket for all targets when there are no sources
    loss_sums = torch.zeros(n_buckets, dtype=torch.float64)
    n_tokens = torch.zeros(n_buckets, dtype=torch.int64)
    n_bytes = torch.zeros(n_buckets, dtype=torch.int64)
    for x, y, sources in data.eval_batches(split, batch_size, max_batches):
        with autocast:
            losses = model.token_losses(x.to(device), y.to(device)).cpu().double()  # MPS has no float64
        learnt = y != IGNORED_TARGET
        buckets = (sources if sources is not None else torch.zeros_like(y))[learnt]
        loss_sums += torch.bincount(buckets, weights=losses[learnt], minlength=n_buckets)
        n_tokens += torch.bincount(buckets, minlength=n_buckets)
        n_bytes += torch.bincount(buckets, weights=token_byte_lengths[y[learnt]].double(), minlength=n_buckets).long()
    out = _bits(loss_sums.sum().item(), int(n_tokens.sum()), int(n_bytes.sum()), data.bytes_per_character(split))
    if names:
        out["sources"] = {name: _bits(loss_sums[i].item(), int(n_tokens[i]), int(n_bytes[i]),
                                      data.source_bytes_per_character(split, name))
                          for i, name in enumerate(names) if n_tokens[i]}
    return out


def _bits(loss_sum, n_tokens, n_bytes, bytes_per_character):
    """loss, bpb and bpc of n_tokens targets of n_bytes bytes whose losses sum to loss_sum (nats);
    NaN when there were none."""
    if not n_tokens:
        return dict(loss=math.nan, bpb=math.nan, bpc=math.nan, tokens=0)
    bits_per_byte = loss_sum / math.log(2) / n_bytes
    return dict(loss=loss_sum / n_tokens, bpb=bits_per_byte, bpc=bits_per_byte * bytes_per_character, tokens=n_tokens)


def sources_text(split_metrics):
    """The per-source part of an evaluation's log line: "" unless the data records several sources."""
    sources = split_metrics.get("sources", {})
    if len(sources) < 2:  # one source's numbers are the split's
        return ""
    return "; by source (bits/char): " + ", ".join(f"{name} {s['bpc']:.3f}" for name, s in sources.items())


# How an allocation that failed says so: torch on the CPU ("DefaultCPUAllocator: can't allocate memory: you tried
# to allocate N bytes"), on a GPU ("CUDA out of memory. Tried to allocate 2.00 GiB"), numpy ("Unable to allocate ...")
ALLOCATION_FAILED = re.compile(r"can't allocate memory|out of memory|unable to allocate", re.IGNORECASE)
ALLOCATION_SIZE = re.compile(r"allocate (\d+) bytes|allocate ([\d.]+ ?[KMGTPE]i?B)", re.IGNORECASE)


@contextmanager
def fits_in_memory(what, device, fix):
    """An allocation that fails inside the block ends the run with one line: what did not fit on
    device, the allocation that failed, and the fix. Every other error passes through unchanged."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        message = str(e)
        if not (isinstance(e, MemoryError) or ALLOCATION_FAILED.search(message)):
            raise
        size = ALLOCATION_SIZE.search(message)
        if size is None:
            failed = "an allocation failed"
        elif size[1]:
            failed = f"an allocation of {int(size[1]) / 2**30:,.1f} GiB failed"
        else:
            failed = f"an allocation of {size[2]} failed"
        raise UserError(f"{what} does not fit in memory on {device}: {failed}; {fix}") from None


def model_fits(device):
    """fits_in_memory for building the model and moving it to the device."""
    return fits_in_memory("the model", device, "use a smaller --n_embd or --n_layer")


def batches_fit(cfg, device, work):
    """fits_in_memory for work ("a training step", "an evaluation") on batches of batch_size windows."""
    return fits_in_memory(f"{work} on --batch_size={cfg['batch_size']} windows of --block_size={cfg['block_size']} tokens",
                          device, "use a smaller --batch_size (a larger --gradient_accumulation_steps keeps the tokens per step)")


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


def other_ranks_rng_states(t):
    """On rank 0, the random states of ranks 1, 2, ... (ckpt.process_rng_state: their dropout's, say),
    for a checkpoint; None elsewhere, or with one process. Every rank must call it together."""
    if t.world_size == 1:
        return None
    states = [None] * t.world_size if t.rank == 0 else None
    dist.gather_object(ckpt.process_rng_state(), states, dst=0)
    return states[1:] if t.rank == 0 else None


def save_training_state(t, config, model_args, iter_num, best_val_loss, tokenizer, file_name, log, other_ranks=None):
    """Write out_dir/file_name: everything --init_from=resume needs to continue exactly. config: the
    run's flags as they stand now (with the horizon a time budget decided); other_ranks:
    other_ranks_rng_states, gathered when the model was checked for saving."""
    state = ckpt.training_state(t.raw_model, t.optimizer, t.scaler, model_args, iter_num, best_val_loss, config,
                                t.batch_generator, tokenizer, t.hessian_generator, t.data.epochs, t.weight_average, t.chat,
                                other_ranks)
    ckpt.save(state, os.path.join(config["out_dir"], file_name))
    log.text(f"saved checkpoint {config['out_dir']}/{file_name} at iter {iter_num}")


class StopRequest:
    """Remembers SIGTERM/SIGINT so the loop can checkpoint at the next step boundary and exit
    (with catch=False the signals keep their default effect)."""

    def __init__(self, catch=True):
        self.signal_name = None
        self.signum = None
        self.stopped = False  # set when the loop stops for a signal, this process's or another rank's
        for sig in (signal.SIGTERM, signal.SIGINT) if catch else ():
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal_name is not None:  # a second signal: the user means it
            raise KeyboardInterrupt
        self.signum, self.signal_name = signum, signal.Signals(signum).name

    def exit_status(self):
        """128 + the signal's number, as a shell reports a process a signal ended: 130 for SIGINT
        (Ctrl-C), 143 for SIGTERM; 143 on a rank that stopped because another rank was signalled."""
        return 128 + (self.signum or signal.SIGTERM)


def weights_are_finite(model, weight_average=None):
    """Whether every weight (and its moving average, if any) is a finite number: a checkpoint is
    saved only then. One host-device sync for all of them."""
    tensors = list(model.parameters()) + (weight_average.params if weight_average else [])
    return bool(torch.stack([torch.isfinite(p).all() for p in tensors]).all())


def rank0_verdict(flag, t):
    """Rank 0's flag, on every rank: rank 0 alone evaluates, and every rank must stop together."""
    if t.world_size == 1:
        return flag
    verdict = torch.tensor(float(flag), device=t.device)
    dist.broadcast(verdict, src=0)
    return bool(verdict.item())


def diverged_message(bad_steps, iter_num, last_saved_iter, cfg, dtype):
    """Why the run stopped, what is left in out_dir, and what to change; without claiming the
    checkpoint is good: the weights may have been diverging for a while before the loss broke."""
    return (f"{bad_steps} consecutive steps had a non-finite loss or gradient; stopped at iter {iter_num}; "
            f"{_kept(last_saved_iter, cfg)}; {_fix(last_saved_iter, dtype)}")


def losses_are_sane(metrics, vocab_size):
    """Whether evaluate's losses are finite and below ten times those of guessing uniformly over the
    vocabulary (ln vocab_size): no model that learned anything is that wrong, and one that a step
    blew up can be, with finite losses and weights. A split with no targets evaluated has none."""
    return all(math.isfinite(split["loss"]) and split["loss"] < 10 * math.log(vocab_size)
               for split in metrics.values() if split["tokens"])  # no targets (a chat window of no reply): nothing measured


def broken_weights_message(iter_num, metrics, weights_finite, last_saved_iter, cfg, dtype):
    """Why a run stopped where it was to save or evaluate: its model is broken (metrics: its losses,
    on rank 0), so nothing of it was saved."""
    if not weights_finite:
        broken = "its weights are no longer finite"
    elif metrics is None:  # a rank other than 0, which does not evaluate
        broken = "its losses are not finite or over ten times those of guessing uniformly"
    else:
        broken = (f"its losses (train {metrics['train']['loss']:.4g}, val {metrics['val']['loss']:.4g}) are not finite "
                  f"or over ten times those of guessing uniformly")
    return (f"the model diverged by iter {iter_num}: {broken}; nothing of it was saved; "
            f"{_kept(last_saved_iter, cfg)}; {_fix(last_saved_iter, dtype)}")


def _kept(last_saved_iter, cfg):
    if last_saved_iter is None:
        return "no checkpoint of this run was saved"
    return (f"the latest checkpoint, {cfg['out_dir']}/{ckpt.FILENAME} (iter {last_saved_iter}), is kept, but it may "
            f"already be diverging: check the losses before it in metrics.jsonl")


def _fix(last_saved_iter, dtype):
    fix = "lower --learning_rate" + (f" or train in --dtype=float32 instead of {dtype}" if dtype != "float32" else "")
    return fix + (", and continue from it with --init_from=resume" if last_saved_iter is not None else ", and rerun")

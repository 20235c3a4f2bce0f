"""Train a GPT on token files from prepare.py, with AdamW, SophiaG or Muon. One loop for all.

    python train.py config/train_tiny_zh_cpu.py
    python train.py config/train_tiny_zh_cpu.py --optimizer=sophiag --learning_rate=3e-4
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_small_sophiag.py

gradient_accumulation_steps is per process: tokens per optimizer step are
batch_size * block_size * gradient_accumulation_steps * world_size (printed at start).

This file reads top to bottom: the options (DEFAULTS), then main: the checks, the set-up, the loop.
The machinery is in opengpt/: run_setup.py (the checks, init_from, out_dir, torchrun), training.py
(train_step, one optimizer step, which bench.py times; evaluate; the log line; the checkpoint),
schedule.py (the learning rate and --max_minutes), optimizers.py (anything about one optimizer).
"""
import atexit
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import parse_args
from opengpt import checkpoint as ckpt
from opengpt import hardware
from opengpt.cli import UserError, run
from opengpt.data import TokenData, data_folder
from opengpt.run_log import RunLog
from opengpt.run_setup import (build_model, build_optimizer, chat_record, check_config, check_nothing_set_aside, claim_out_dir,
                               pretrained_shape, setup_distributed, start_weight_average, stream_seed)
from opengpt.schedule import Schedule, TimeBudget
from opengpt.training import (StepClock, StopRequest, Training, batches_fit, broken_weights_message, diverged_message,
                              evaluate, log_training_step, losses_are_sane, model_fits, other_ranks_rng_states, rank0_verdict,
                              save_training_state, sources_text, train_step, weights_are_finite)

DEFAULTS = dict(
    # output and evaluation
    out_dir="out",
    eval_interval=2000,
    log_interval=1,
    eval_iters=200,  # batches per split in an evaluation
    val_full_split=False,  # evaluate val on every window of the split, whatever eval_iters says
    eval_only=False,  # evaluate once and stop: adds to metrics.jsonl, saves and removes nothing
    always_save_checkpoint=True,  # save at every evaluation; False: only when val loss improves (kept as ckpt_best.pt too)
    ckpt_interval=0,  # also save every N iterations whatever the val loss (0 = off)
    keep_best_checkpoint=False,  # also keep ckpt_best.pt, the checkpoint with the best val loss
    init_from="scratch",  # scratch | resume | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a transformers folder | a run's out_dir (fine-tune its weights)
    overwrite_out_dir=False,  # let a new run replace the checkpoints and log of an earlier run in out_dir
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
    document_mask=False,  # attend within a document only: documents packed in a block (chat conversations) do not see each other, and positions restart at each
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
    hessian_batch="fresh",  # SophiaG's Hessian windows: fresh (drawn after the step, as the authors) | step (the step's own, one forward for both)
    ema_decay=0.0,  # > 0: evaluate and save a moving average of the weights (weight_average.py); 0 = off
    decay_embeddings=True,  # weight decay on wte (shared with the head) and wpe too, as nanoGPT; the Sophia authors: False
    # learning-rate schedule: linear warmup, then cosine decay to min_lr at lr_decay_iters
    decay_lr=True,
    warmup_iters=2000,
    lr_decay_iters=600000,
    min_lr=6e-5,
    # train for a wall-clock budget: max_iters = lr_decay_iters are fitted to it from the measured step
    # time, and re-fitted when the machine's speed changes, so the decay ends at the budget (0 = off)
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


def main(optimizer=None):
    """optimizer: the default --optimizer (train_adam.py and train_sophiag.py pass theirs); a config
    file or --optimizer still wins. A run of several processes (torchrun) ends its process here, once all
    is saved and closed (see the end): what a caller would do after main() does not run."""
    # options: the defaults, then config files, then --key=value overrides (configurator.py)
    cfg = parse_args(DEFAULTS | ({"optimizer": optimizer} if optimizer is not None else {}), sys.argv[1:])
    check_config(cfg)

    # the device, the processes of a torchrun, the precision
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

    check_nothing_set_aside(cfg["out_dir"])
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

    # the model (scratch, resume or GPT-2), its optimizer, and the checkpoint's state when resuming
    with model_fits(device):
        model, model_args, checkpoint, vocab_growth = build_model(cfg, data, data_dir, tokenizer)
    resumed_config = checkpoint["config"] if checkpoint else None
    # from pretrained weights (and resuming such a run): the log and checkpoints record their shape
    cfg = cfg | pretrained_shape(cfg, model_args, resumed_config)
    iter_num, best_val_loss = (checkpoint["iter_num"], checkpoint["best_val_loss"]) if checkpoint else (0, float("inf"))
    chat = chat_record(data, vocab_growth, checkpoint)  # a chat fine-tuning's template and vocabulary growth
    out_dir_claim = claim_out_dir(cfg) if is_master else None
    with model_fits(device):
        model.to(device)
    weight_average = start_weight_average(cfg, model, checkpoint, is_master)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    optimizer = build_optimizer(cfg, model, device_type)
    if checkpoint is not None:
        ckpt.restore_training_state(checkpoint, optimizer, scaler, batch_generator, hessian_generator, rank, data.epochs,
                                    world_size)
        checkpoint = None  # free the memory

    raw_model = model
    if cfg["compile"]:
        model = torch.compile(model)
    if world_size > 1:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
    t = Training(cfg=cfg, model=model, raw_model=raw_model, optimizer=optimizer, scaler=scaler,
                 autocast=hardware.autocast_context(device, dtype), data=data, device=device, rank=rank,
                 world_size=world_size, batch_generator=batch_generator, hessian_generator=hessian_generator,
                 weight_average=weight_average, chat=chat)
    log = RunLog(cfg, is_master, machine=hardware.device_name(device))
    # a run that ends unfinished before its first checkpoint (an error, a crash; not kill -9) takes back
    # its log, so the folder is as it was and the rerun its error suggests is not refused
    atexit.register(log.discard_unless_kept)
    stop = StopRequest(catch=not cfg["eval_only"])  # an evaluation alone saves nothing: Ctrl-C ends it at once

    if is_master:
        log.text(f"tokens per optimizer step: {t.tokens_per_step:,} = {cfg['batch_size']} batch x {cfg['block_size']} block "
                 f"x {cfg['gradient_accumulation_steps']} accumulation x {world_size} processes")
        saved_tokens = resumed_config and resumed_config.get("tokens_per_step")  # none in checkpoints before it was saved
        if saved_tokens and saved_tokens != t.tokens_per_step:
            log.text(f"note: the checkpoint's run took {saved_tokens:,} tokens per step ({resumed_config['world_size']} "
                     f"processes x {resumed_config['gradient_accumulation_steps']} accumulation); this one takes "
                     f"{t.tokens_per_step:,}: keep processes x --gradient_accumulation_steps to train as it did")
        saved_data = resumed_config and data_folder(resumed_config)
        if saved_data and os.path.normpath(saved_data) != os.path.normpath(data_dir):
            log.text(f"note: the checkpoint's run trained on {saved_data}; this one goes on with {data_dir} (the same "
                     f"tokenizer): its batches and val loss are that folder's")
        log.text(f"model: {raw_model.get_num_params() / 1e6:.2f}M parameters, {cfg['optimizer']} optimizer, "
                 f"device {device} ({hardware.device_name(device)}), dtype {dtype}")
        if t.spec.describe(cfg):
            log.text(t.spec.describe(cfg))
        if vocab_growth:
            log.text(f"vocabulary grown from {vocab_growth['from']:,} to {vocab_growth['to']:,} tokens for "
                     f"{' '.join(vocab_growth['tokens'])}: their rows start at the mean of the others")
        if data.chat:
            log.text("chat data: the loss counts the assistant's replies only")
        if data.epochs:
            log.text(f"training windows: the train split's {data.epochs.windows_per_epoch:,} windows in a new "
                     f"random order every epoch (sampling=epochs)")
        if weight_average:
            log.text(f"evaluating and saving a moving average of the weights (ema_decay={cfg['ema_decay']})")
    peak, peak_source = hardware.peak_flops(device, dtype) if is_master else (None, "")
    log.event("peak_flops", flops=peak, source=peak_source)

    # the loop: the learning rate, an evaluation (and checkpoint) every eval_interval, one step, its log line
    budget = TimeBudget(cfg["eval_interval"], world_size, device, rank)
    schedule = budget.start(Schedule.from_config(cfg), resumed_config)  # with --max_minutes, the horizon comes later
    if schedule.max_minutes != cfg["max_minutes"]:  # a resumed budget: its own, whatever the flags say now
        log.text(f"note: the run in {cfg['out_dir']} keeps its own time budget ({schedule.max_minutes:g} min) and the "
                 f"schedule it decided (--max_minutes and --max_iters here are not used); for a new budget, start a run "
                 f"from its weights in another folder: --init_from={cfg['out_dir']} --out_dir=NEW")
    start_iter = iter_num
    last_saved_iter = iter_num if cfg["init_from"] == "resume" else None

    run_shape = dict(world_size=world_size, tokens_per_step=t.tokens_per_step)  # for a resume on another number of processes

    def save_checkpoint(file_name, other_ranks):
        nonlocal last_saved_iter
        # the flags as they stand: with --max_minutes, what was decided so far and the seconds used, so a resume goes on
        save_training_state(t, cfg | asdict(schedule) | budget.saved_state() | run_shape, model_args, iter_num, best_val_loss,
                            tokenizer, file_name, log, other_ranks)
        log.keep()
        out_dir_claim.earlier_run_replaced()
        if file_name == ckpt.FILENAME:
            last_saved_iter = iter_num

    def evaluation(spot_check=False):
        """The losses of the model a checkpoint saves (the weight average, if any), on rank 0.
        spot_check: one batch per split, for a save between evaluations."""
        with (weight_average.swapped_in(raw_model) if weight_average else nullcontext(),
              batches_fit(cfg, device, "an evaluation")):
            return evaluate(raw_model, data, cfg | ({"eval_iters": 1, "val_full_split": False} if spot_check else {}),
                            device, t.autocast, token_byte_lengths)

    def stop_unless_sane(metrics):
        """Before anything is saved, on every rank together: weights that are no longer finite, or
        rank 0's losses of them (metrics) that are not sane, stop the run with nothing saved, so they
        never replace a checkpoint that was. A step that blows the weights up can have a finite loss.
        Returns what a checkpoint needs of the other ranks (on rank 0): their random states."""
        weights_finite = rank0_verdict(weights_are_finite(raw_model, weight_average), t)
        losses_sane = rank0_verdict(metrics is None or losses_are_sane(metrics, data.vocab_size), t)
        if not (weights_finite and losses_sane):
            raise UserError(broken_weights_message(iter_num, metrics, weights_finite, last_saved_iter, cfg, dtype))
        return other_ranks_rng_states(t)

    def may_save(the_checkpoints_weights=False):
        # nothing before a step of this run (a resumed run would rewrite its checkpoint, an evaluation
        # only reads it), unless asked for a copy of the resumed checkpoint's own weights; nothing while
        # steps fail (weights whose gradient is not finite may have blown up on a step whose loss was
        # finite); nothing before a --max_minutes horizon is decided, so that its error ("give more
        # minutes") leaves nothing behind
        started = iter_num > start_iter or (the_checkpoints_weights and cfg["init_from"] == "resume")
        return started and not cfg["eval_only"] and bad_steps == 0 and not (budget.enabled and not budget.fixed)

    # ckpt_best.pt: asked for, or where ckpt.pt is saved only on improvements, so that a stop's or
    # --ckpt_interval's save (the latest weights, for a resume) never replaces the best ones unsaid
    keeps_best = cfg["keep_best_checkpoint"] or not cfg["always_save_checkpoint"]

    def evaluates_at(iter_num):
        return iter_num % cfg["eval_interval"] == 0 or iter_num == schedule.max_iters

    def interval_due(iter_num):
        return cfg["ckpt_interval"] and iter_num % cfg["ckpt_interval"] == 0

    bad_steps, total_bad_steps = 0, 0
    clock = StepClock()
    while True:
        lr = schedule.learning_rate_at(iter_num)
        for group in optimizer.param_groups:
            group["lr"] = lr

        if evaluates_at(iter_num) or cfg["eval_only"]:  # a checkpoint a stop saved is at any iteration
            t_eval = time.perf_counter()
            metrics = evaluation() if is_master else None
            if is_master:
                train, val = metrics["train"], metrics["val"]
                log.event("eval", iter=iter_num, train_loss=train["loss"], val_loss=val["loss"], train_bpc=train["bpc"],
                          val_bpc=val["bpc"], val_bpb=val["bpb"], lr=lr, **({"val_sources": val["sources"]} if "sources" in val else {}))
                log.text(f"step {iter_num}: train loss {train['loss']:.4f}, val loss {val['loss']:.4f}, "
                         f"val {val['bpc']:.3f} bits/char ({val['bpb']:.3f} bits/byte){sources_text(val)}")
            other_ranks = stop_unless_sane(metrics)
            if is_master:
                improved = val["loss"] < best_val_loss
                best_val_loss = min(best_val_loss, val["loss"])
                saved = may_save() and (cfg["always_save_checkpoint"] or val["loss"] <= best_val_loss or interval_due(iter_num))
                if saved:
                    save_checkpoint(ckpt.FILENAME, other_ranks)
                # after ckpt.pt, which a resume needs. A resumed run's first evaluation may be the first of the
                # checkpoint's weights (a run stopped by a signal just before an evaluation saves them unevaluated):
                # they may be the best.
                if improved and keeps_best and may_save(the_checkpoints_weights=True):
                    if saved:  # the same weights: a second name for ckpt.pt, not a second write
                        ckpt.save_copy(*(os.path.join(cfg["out_dir"], name) for name in (ckpt.FILENAME, ckpt.BEST_FILENAME)))
                        log.text(f"saved checkpoint {cfg['out_dir']}/{ckpt.BEST_FILENAME} at iter {iter_num}")
                    else:
                        save_checkpoint(ckpt.BEST_FILENAME, other_ranks)
                budget.evaluated(time.perf_counter() - t_eval)
                clock.restart()  # evaluation time is not training time
        if cfg["eval_only"] or iter_num >= schedule.max_iters:
            if bad_steps:  # the run ends on failing steps, not saved: not a success
                raise UserError(diverged_message(bad_steps, iter_num, last_saved_iter, cfg, dtype))
            break

        log_due = iter_num % cfg["log_interval"] == 0
        with batches_fit(cfg, device, "a training step"):
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
        schedule, budget_note = budget.after_step(iter_num, schedule)
        if budget_note:
            event, line = budget_note
            log.text(line)
            log.event(event, iter=iter_num, **schedule.decisions())
        if log_due:
            log_training_step(t, log, iter_num - 1, lr, step, clock.lap(), total_bad_steps, peak)

        if step.stop:
            stop.stopped = True
            if bad_steps:  # stopped while steps fail: those weights are not saved
                raise UserError(diverged_message(bad_steps, iter_num, last_saved_iter, cfg, dtype))
            other_ranks = stop_unless_sane(evaluation(spot_check=True) if is_master else None)
            if is_master:
                save_checkpoint(ckpt.FILENAME, other_ranks)
                log.text(f"received {stop.signal_name or 'a stop request'}: stopping with exit status {stop.exit_status()}; "
                         f"continue with the same command plus --init_from=resume")
            break
        # where an evaluation comes next, it saves (interval_due): not two writes of one checkpoint in a row
        if interval_due(iter_num) and may_save() and not evaluates_at(iter_num):
            other_ranks = stop_unless_sane(evaluation(spot_check=True) if is_master else None)
            if is_master:
                save_checkpoint(ckpt.FILENAME, other_ranks)

    # only --always_save_checkpoint=False gets here: the last evaluation saves otherwise (rank 0 knows; all stop)
    if rank0_verdict(last_saved_iter in (None, start_iter) and iter_num > start_iter and not stop.stopped, t):
        raise UserError(f"no evaluation of iters {start_iter}-{iter_num} beat the best val loss ({best_val_loss:.4f}, "
                        f"{'the checkpoint' if start_iter else 'iter 0'}'s), and --always_save_checkpoint=False saves only "
                        f"improvements: {'ckpt.pt still holds iter ' + str(start_iter) if start_iter else 'nothing was saved'}; "
                        f"lower --learning_rate, or pass --always_save_checkpoint=True to keep the last weights")
    if budget.enabled:
        log.event("time_budget_end", iter=iter_num, elapsed_seconds=budget.elapsed(), budget_seconds=budget.seconds,
                  decay_finished=iter_num == schedule.lr_decay_iters)
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
    if out_dir_claim is not None:
        out_dir_claim.release()
    # saved but not finished: a non-zero status, so `train.py && export.py` does not go on
    status = stop.exit_status() if stop.stopped else 0
    if world_size > 1:
        # gloo's worker thread may still be dropping the last collective's tensors, which takes the GIL:
        # during the interpreter's shutdown that aborts the process (SIGABRT, "terminate called without an
        # active exception"; 2 of 36 two-process runs here, 0 of 80 leaving so). All is saved and closed.
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    run(main)

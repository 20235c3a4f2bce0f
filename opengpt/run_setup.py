"""What train.py does before its loop: check the flags, join the processes of a torchrun, claim
out_dir, and build the model (from scratch, a checkpoint or GPT-2) and its weight average."""
import atexit
import contextlib
import math
import os

import numpy as np
import torch
import torch.distributed as dist

from model import GPT, GPTConfig
from opengpt import checkpoint as ckpt
from opengpt import folder_lock
from opengpt import optimizers
from opengpt import run_log
from opengpt.cli import UserError, first_line
from opengpt.data import SAMPLINGS
from opengpt.schedule import MAX_MINUTES
from opengpt.weight_average import WeightAverage

# What a checkpoint fixes: the model's shape, and the optimizer whose state (hyperparameters included:
# load_state_dict restores them) it holds. A resumed run must be given the same values.
CHECKPOINT_SHAPE = ("n_layer", "n_head", "n_embd", "block_size", "bias", "scale_attn_by_inverse_layer_idx", "rotary",
                    "activation", "document_mask")
# what a pretrained model's weights fix of that shape: a run started from them (and its resumes) takes these from
# the weights, not from the flags (--block_size crops them; --document_mask is the run's choice)
WEIGHTS_SHAPE = tuple(key for key in CHECKPOINT_SHAPE if key not in ("block_size", "document_mask"))
CHECKPOINT_OPTIMIZER = ("optimizer", "beta1", "beta2", "weight_decay", "decay_embeddings")


BACKENDS = ("auto", "gloo", "nccl", "mpi", "ucc")  # torch.distributed's; auto: nccl on CUDA, gloo otherwise


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
    # (with --max_minutes the budget sets the decay's length)
    if cfg["decay_lr"] and not cfg["max_minutes"] and cfg["lr_decay_iters"] <= cfg["warmup_iters"]:
        raise UserError(f"--lr_decay_iters ({cfg['lr_decay_iters']}) must exceed --warmup_iters ({cfg['warmup_iters']})")
    for key in ("learning_rate", "min_lr"):
        if not math.isfinite(cfg[key]):  # 1e999 reads as inf
            raise UserError(f"--{key} must be a finite number, got {cfg[key]}")
    if cfg["learning_rate"] <= 0 or cfg["min_lr"] < 0:
        raise UserError("--learning_rate must be positive and --min_lr zero or positive")
    if cfg["decay_lr"] and cfg["min_lr"] > cfg["learning_rate"]:
        raise UserError(f"--min_lr={cfg['min_lr']:g} exceeds --learning_rate={cfg['learning_rate']:g}, so the decay would "
                        f"raise the rate; pass a --min_lr below it (a tenth is usual), or --decay_lr=False")
    if not 0 <= cfg["max_minutes"] <= MAX_MINUTES:  # written so that nan fails too
        raise UserError(f"--max_minutes must be between 0 (no time budget) and {MAX_MINUTES:,} (a year), "
                        f"got {cfg['max_minutes']:g}")
    if cfg["backend"] not in BACKENDS:  # nanoGPT's configs say nccl: on a CPU that is a traceback on every rank
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {cfg['backend']}")
    if cfg["hessian_batch"] not in ("fresh", "step"):
        raise UserError(f"--hessian_batch must be fresh or step, got {cfg['hessian_batch']}")
    if cfg["hessian_batch"] == "step" and cfg["hess_accumulation_steps"] not in (0, cfg["gradient_accumulation_steps"]):
        raise UserError(f"--hessian_batch=step estimates the Hessian on all of the step's {cfg['gradient_accumulation_steps']} "
                        f"micro-batches; drop --hess_accumulation_steps={cfg['hess_accumulation_steps']} or use --hessian_batch=fresh")
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


def check_resume_matches(cfg, checkpoint, path):
    """A one-line error listing every value the checkpoint fixes that the command line changed."""
    saved_config = checkpoint.get("config") or {}
    # a run from pretrained weights took their shape, whatever its flags (pretrained_shape)
    shape = [key for key in CHECKPOINT_SHAPE if key not in WEIGHTS_SHAPE] if weights_source(saved_config) else CHECKPOINT_SHAPE
    saved = {key: checkpoint["model_args"][key] for key in shape if key in checkpoint["model_args"]}
    keys = CHECKPOINT_OPTIMIZER + {"sophiag": ("rho",), "muon": ("muon_momentum",)}.get(cfg["optimizer"], ())
    saved |= {key: saved_config[key] for key in keys if saved_config.get(key) is not None}
    if "trained_model" in checkpoint and not cfg["ema_decay"]:  # without it, the average would be dropped unsaid
        saved["ema_decay"] = saved_config.get("ema_decay")
    differing = [key for key, value in saved.items() if cfg[key] != value]
    if differing:
        theirs = ", ".join(f"{key} {saved[key]}" for key in differing)
        fix = " ".join(f"--{key}={saved[key]}" for key in differing)
        raise UserError(f"the checkpoint {path} was trained with {theirs}, which a resumed run cannot change; "
                        f"pass {fix} (the run's own command plus --init_from=resume), or start a new run in another --out_dir")


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
    if backend == "nccl" and not device.startswith("cuda"):
        raise UserError(f"--backend=nccl needs CUDA GPUs, and this run is on {device}; use --backend=auto (gloo off a GPU)")
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(backend=backend)
    except (RuntimeError, AssertionError, ValueError) as e:  # a backend this torch was built without (MPI, UCC)
        if "built in" not in str(e) and "backend" not in str(e).lower():
            raise
        raise UserError(f"--backend={backend} does not work here ({first_line(e)}); use --backend=auto") from None
    return rank, local_rank, world_size


def stream_seed(seed, stream):
    """The seed of a random stream of its own for the run seeded `seed`: not a shifted copy of
    another stream, as seed + 1 would be of the next run's."""
    return int(np.random.SeedSequence([seed % 2**63, *stream.encode()]).generate_state(1, np.uint64)[0] >> 1)


def make_out_dir(out_dir):
    """Create out_dir if it is missing; whether this call made it."""
    if not out_dir:
        raise UserError("--out_dir is empty; name a folder, e.g. --out_dir=out")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out_dir={out_dir} is an existing file, not a folder; choose another name")
    made = not os.path.isdir(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out_dir={out_dir}: {e.strerror or e}") from None
    return made


class ClaimedOutDir:
    """out_dir, locked for this run. release() unlocks it, and removes the folder if this run made it
    and leaves it empty: a run that failed before writing anything leaves nothing behind. With
    --overwrite_out_dir=True the earlier run's files wait in out_dir/.replaced_run until this run's
    first checkpoint (earlier_run_replaced), and release() puts them back if it saved none."""

    def __init__(self, path, lock, made_here):
        self.path, self.lock, self.made_here = path, lock, made_here
        self.set_aside = None
        atexit.register(self.release)  # after the lock registered its own, so this runs first

    def set_aside_earlier_run(self):
        names = [name for name in EARLIER_RUN_FILES if os.path.lexists(os.path.join(self.path, name))]
        if not names:
            return
        aside = os.path.join(self.path, SET_ASIDE)
        try:
            os.makedirs(aside, exist_ok=True)
            self.set_aside = aside  # from here, what moved goes back at release, should the rest fail
            for name in names:  # so that a resume after a crash can never pick up the earlier run's state
                os.replace(os.path.join(self.path, name), os.path.join(aside, name))
        except OSError as e:
            raise UserError(f"cannot set the earlier run in {self.path} aside: {e.strerror or e}") from None

    def earlier_run_replaced(self):
        """This run saved a checkpoint: the earlier run's files go."""
        if self.set_aside:
            for name in EARLIER_RUN_FILES:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.set_aside, name))
            with contextlib.suppress(OSError):
                os.rmdir(self.set_aside)
            self.set_aside = None

    def release(self):
        if self.set_aside:  # no checkpoint of this run (its log is gone already: RunLog.discard_unless_kept)
            for name in os.listdir(self.set_aside):
                with contextlib.suppress(OSError):
                    os.replace(os.path.join(self.set_aside, name), os.path.join(self.path, name))
            with contextlib.suppress(OSError):
                os.rmdir(self.set_aside)
            self.set_aside = None
        self.lock.release()  # removes out_dir/.lock
        if self.made_here:
            with contextlib.suppress(OSError):  # not empty: what the run wrote stays
                os.rmdir(self.path)
            self.made_here = False


EARLIER_RUN_FILES = (ckpt.FILENAME, ckpt.BEST_FILENAME, run_log.FILENAME)
SET_ASIDE = ".replaced_run"  # an earlier run's files while an --overwrite_out_dir=True run has saved nothing


def check_nothing_set_aside(out_dir):
    """A UserError where an --overwrite_out_dir=True run was killed (kill -9, a crash of the machine)
    before its first checkpoint and left the earlier run it set aside: the user says which run to keep."""
    aside = os.path.join(out_dir, SET_ASIDE)
    if os.path.isdir(aside):
        folder_lock.check_not_busy(out_dir, "train.py", inside=True)  # that run, still alive: say that instead
        raise UserError(f"{aside} holds the earlier run an --overwrite_out_dir=True run set aside and was killed before its "
                        f"first checkpoint: to keep that run, move its files back into {out_dir}; to let it go, delete {aside}")


def earlier_run_refusal(cfg):
    """Why this run may not start in out_dir, or None: a new run would replace the checkpoint an
    earlier run left there, or truncate its log (even with --overwrite_out_dir when it starts from that
    very checkpoint). A resumed run continues that run; an evaluation (--eval_only) only adds lines to
    its log, and of that run's checkpoint, not of untrained weights."""
    out_dir, init_from = cfg["out_dir"], cfg["init_from"]
    if cfg["eval_only"] and init_from == "scratch" and os.path.exists(os.path.join(out_dir, ckpt.FILENAME)):
        return (f"--eval_only=True with --init_from=scratch would evaluate untrained weights into the log of the run in "
                f"{out_dir}; evaluate its checkpoint with --init_from=resume")
    if init_from == "resume" or cfg["eval_only"]:
        return None
    if os.path.isdir(init_from) and os.path.isdir(out_dir) and os.path.samefile(init_from, out_dir):
        return (f"--init_from={init_from} is --out_dir itself: a new run there would replace the weights it starts "
                f"from, even before its first save; give another --out_dir, or continue that run with --init_from=resume")
    if cfg["overwrite_out_dir"]:
        return None
    found = [name for name in EARLIER_RUN_FILES if os.path.exists(os.path.join(out_dir, name))]
    if not found:
        return None
    if found[0] != run_log.FILENAME:
        return (f"{out_dir} holds the checkpoint of an earlier run ({found[0]}); continue it with "
                f"--init_from=resume, or start over with --overwrite_out_dir=True")
    return (f"{out_dir} holds the log of an earlier run ({run_log.FILENAME}) but no checkpoint to continue it from; "
            f"choose another --out_dir, or start over with --overwrite_out_dir=True (which replaces that log)")


def claim_out_dir(cfg):
    """Make out_dir and lock it for this run (rank 0 only). A new run is refused a folder holding an
    earlier run's checkpoint or log unless --overwrite_out_dir=True, which replaces them (ClaimedOutDir). The refusal
    comes before the lock, so a refused run writes nothing, and again under it, as another run may
    have saved in between. Returns the ClaimedOutDir: keep it."""
    out_dir = cfg["out_dir"]
    made_here = make_out_dir(out_dir)
    refusal = earlier_run_refusal(cfg)
    if refusal:
        folder_lock.check_not_busy(out_dir, "train.py", inside=True)  # a live run's folder: say that instead
        raise UserError(refusal)
    try:
        lock = folder_lock.FolderLock(out_dir, "train.py", inside=True)
    except OSError as e:  # a read-only or full filesystem, no permission; or a .lock that is not a file
        lock_path = os.path.join(out_dir, folder_lock.INSIDE_NAME)
        if os.path.islink(lock_path) or os.path.isdir(lock_path):
            raise UserError(f"{lock_path} is a link or a folder, not the lock file train.py keeps there; "
                            f"move it out of --out_dir") from None
        raise UserError(f"cannot write in --out_dir={out_dir}: {e.strerror or e}") from None
    claim = ClaimedOutDir(out_dir, lock, made_here)
    refusal = earlier_run_refusal(cfg)
    if refusal:
        claim.release()
        raise UserError(refusal)
    if cfg["overwrite_out_dir"] and cfg["init_from"] != "resume" and not cfg["eval_only"]:
        claim.set_aside_earlier_run()
    return claim


def model_args_from(cfg, vocab_size, eot_token=0):
    """GPTConfig's fields as the run's flags set them, for a model of vocab_size (already padded) whose
    tokenizer closes documents with eot_token."""
    return dict(n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"], block_size=cfg["block_size"],
                bias=cfg["bias"], vocab_size=vocab_size, dropout=cfg["dropout"],
                scale_attn_by_inverse_layer_idx=cfg["scale_attn_by_inverse_layer_idx"], rotary=cfg["rotary"],
                activation=cfg["activation"], document_mask=cfg["document_mask"], eot_token=eot_token)


def build_model(cfg, data, data_dir, tokenizer):
    """(model, model_args, checkpoint, vocab_growth): the GPT that init_from names, on the CPU; the
    checkpoint when resuming (its optimizer and random states are restored later), else None. From
    pretrained weights (a run's out_dir, GPT-2, a transformers folder) model_args hold their shape,
    not the flags', and the optimizer starts afresh; when the data's tokenizer is theirs plus the
    chat tokens, the vocabulary grows (grow_vocabulary) and vocab_growth records it, else it is None."""
    checkpoint, vocab_growth = None, None
    model_args = model_args_from(cfg, data.padded_vocab_size, tokenizer.eot_token)
    if cfg["init_from"] == "scratch":
        model = GPT(GPTConfig(**model_args))
    elif cfg["init_from"] == "resume":
        checkpoint_path = os.path.join(cfg["out_dir"], ckpt.FILENAME)
        if os.environ.get("RANK", "0") != os.environ.get("LOCAL_RANK", "0") and not os.path.lexists(checkpoint_path):
            raise UserError(f"{checkpoint_path} is not on this node (rank {os.environ['RANK']}): rank 0 alone writes "
                            f"checkpoints, so with several nodes --out_dir must be a folder every node sees (a shared filesystem)")
        checkpoint = ckpt.load(checkpoint_path)
        ckpt.check_same_tokenizer(checkpoint, tokenizer, data_dir)
        check_resume_matches(cfg, checkpoint, checkpoint_path)
        model_args = checkpoint["model_args"] | {"dropout": cfg["dropout"]}
        model = ckpt.model_from(checkpoint, cfg["dropout"])
    else:  # pretrained weights: a run's out_dir (its ckpt.pt) or GPT-2's (a hub name or a transformers folder)
        pretrained = ckpt.load_pretrained(cfg["init_from"]) if ckpt.is_run_folder(cfg["init_from"]) else None
        weights_tokenizer = ckpt.tokenizer_of(pretrained) if pretrained else ckpt.pretrained_tokenizer(cfg["init_from"])
        added = ckpt.tokens_to_add(cfg["init_from"], weights_tokenizer, tokenizer, data_dir)
        if pretrained:
            model = ckpt.model_from(pretrained, cfg["dropout"])
        else:
            model = ckpt.gpt2_model(cfg["init_from"], cfg["dropout"])
        if cfg["block_size"] > model.config.block_size:
            raise UserError(f"--block_size={cfg['block_size']} exceeds {cfg['init_from']}'s {model.config.block_size}")
        model.crop_block_size(cfg["block_size"])
        if added:
            vocab_growth = grow_vocabulary(model, weights_tokenizer.n_vocab, added, data.padded_vocab_size)
        # how it attends is this run's choice, not the weights' (a base model is pretrained without the mask)
        model.config.document_mask, model.config.eot_token = cfg["document_mask"], tokenizer.eot_token
        model_args = {k: getattr(model.config, k) for k in model_args}
    if model.config.vocab_size < data.vocab_size:
        raise UserError(f"the model's vocabulary ({model.config.vocab_size}) is smaller than the data's ({data.vocab_size})")
    model.chunked_head_loss = cfg["chunked_head_loss"]
    return model, model_args, checkpoint, vocab_growth


@torch.no_grad()
def grow_vocabulary(model, n_real, added, vocab_size):
    """Give the embedding (and the head tied to it) vocab_size rows (padded), for tokens n_real,
    n_real + 1, ... named in added: their rows, and any padding rows the model did not have, start at
    the mean of the n_real real rows, an average token, rather than at random. The record for the
    checkpoint (contract: chat_interfaces.md)."""
    old = model.lm_head.weight
    grown = torch.empty(max(vocab_size, old.size(0)), old.size(1), dtype=old.dtype)
    mean = old[:n_real].float().mean(dim=0).to(old.dtype)
    grown[:old.size(0)] = old
    grown[n_real:n_real + len(added)] = mean
    grown[old.size(0):] = mean
    # built on the meta device: no memory, and no draw from the random state, for weights replaced at once
    model.lm_head = torch.nn.Linear(old.size(1), grown.size(0), bias=False, device="meta")
    model.lm_head.weight = torch.nn.Parameter(grown)
    model.transformer.wte = torch.nn.Embedding(grown.size(0), old.size(1), device="meta")
    model.transformer.wte.weight = model.lm_head.weight  # tied again, as GPT.__init__ ties them
    model.config.vocab_size = grown.size(0)
    return {"from": n_real, "to": n_real + len(added), "tokens": list(added), "init": "mean"}


def chat_record(data, vocab_growth, checkpoint):
    """What the checkpoints of a run on a chat data folder record of it (None for other data): the
    folder's template and how the vocabulary grew; a resumed run keeps the record of the run it continues."""
    if checkpoint is not None:
        return checkpoint.get("chat")
    if data.chat is None:
        return None
    return {"template": data.chat.get("template"), "vocab_growth": vocab_growth}


def weights_source(run_config):
    """The pretrained model (a run's out_dir, GPT-2, a transformers folder) the run of run_config (a
    checkpoint's "config") started from, or None for a run from scratch. Its resumes record it as
    weights_from; checkpoints from before that field was recorded have it as init_from (before any resume)."""
    init_from = run_config.get("init_from")
    return run_config.get("weights_from") or (init_from if init_from not in (None, "scratch", "resume") else None)


def pretrained_shape(cfg, model_args, resumed_config=None):
    """The flags to record for the model's shape, and where the weights came from: the pretrained
    model's shape where the run started from one (init_from names it, or a resumed run's config does),
    so the log and checkpoints say what was trained; none otherwise (the flags are the shape)."""
    source = weights_source(resumed_config or {}) if cfg["init_from"] == "resume" else weights_source(cfg)
    if not source:
        return {}
    return {"weights_from": source} | {key: model_args[key] for key in CHECKPOINT_SHAPE}


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

"""Checkpoints: what a training run saves, atomically, and how train.py and sample.py load it.

A checkpoint is plain data (tensors, numbers, strings, lists, dicts), so it loads with
torch.load(weights_only=True): opening someone else's checkpoint cannot run their code. It carries
a SHA-256 of its contents, checked on load: torch's own reader checks nothing, so bytes flipped on a
disk or in a copy would otherwise load as silently wrong weights and optimizer state.
"""
import errno
import hashlib
import os
import random
import sys

import numpy as np
import torch

from opengpt import tokenizer as tok
from opengpt.cli import UserError, space_left, write_atomically
from opengpt.data import data_folder
from model import GPT, GPTConfig

FILENAME = "ckpt.pt"
BEST_FILENAME = "ckpt_best.pt"
FORMAT = "open-gpt-training/2"  # /2 added the checksum
UNCHECKED_FORMAT = "open-gpt-training/1"  # still loads, unverified: it predates the checksum
# How an optimizer runs on this machine, not what it has learnt: load_state_dict would copy the saving
# machine's choice (a CPU run's foreach=True over a fused CUDA AdamW, which a GradScaler then trips on).
OPTIMIZER_IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable")


def training_state(model, optimizer, scaler, model_args, iter_num, best_val_loss, config, batch_generator, tokenizer,
                   hessian_generator=None, train_windows=None, weight_average=None):
    """Everything `init_from=resume` needs to continue the run exactly, and the tokenizer that
    sample.py and export.py need to turn its tokens into text without the data folder. With a
    weight_average (weight_average.py), "model" is the average and "trained_model" the weights trained."""
    np_state = np.random.get_state()
    rng = dict(
        python=random.getstate(),
        numpy=[np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        torch=torch.get_rng_state(),
        batches=batch_generator.get_state(),
    )
    if hessian_generator is not None:
        rng["hessian"] = hessian_generator.get_state()
    if train_windows is not None:
        rng["train_windows"] = train_windows.state_dict()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    averaged = {} if weight_average is None else dict(
        model=weight_average.averaged_state_dict(model), trained_model=model.state_dict(),
        weight_average_updates=weight_average.updates)
    return dict(
        format=FORMAT,
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        scaler=scaler.state_dict(),
        model_args=model_args,
        iter_num=iter_num,
        best_val_loss=best_val_loss,
        config=config,
        rng=rng,
        tokenizer=tokenizer.spec,
    ) | averaged


def save(state, path):
    """Write state and its checksum to path atomically; a full or read-only disk is a UserError,
    and the file that would have been replaced is left as it was."""
    state = state | {"checksum": payload_checksum(state)}
    try:
        write_atomically(path, lambda temp_path: torch.save(state, temp_path))
    except OSError as e:
        full = f", {space_left(path)}" if e.errno == errno.ENOSPC else ""
        raise UserError(f"could not write checkpoint {path} ({e.strerror or e}{full}); "
                        f"any earlier {os.path.basename(path)} there is intact") from None
    except RuntimeError as e:  # torch's zip writer reports a failed write (a full disk) as RuntimeError
        if "inline_container" not in str(e) and "PytorchStreamWriter" not in str(e):
            raise
        raise UserError(f"could not write checkpoint {path} (the write failed, {space_left(path)}); "
                        f"any earlier {os.path.basename(path)} there is intact") from None


def payload_checksum(state):
    """SHA-256 of everything in a checkpoint but the checksum itself: each tensor's dtype, shape and
    bytes, each number and string, in order. Lists and tuples hash alike (a load may turn one into
    the other)."""
    digest = hashlib.sha256()
    _feed(digest, {key: value for key, value in state.items() if key != "checksum"})
    return digest.hexdigest()


def _feed(digest, value):
    if isinstance(value, torch.Tensor):
        digest.update(f"tensor {value.dtype} {tuple(value.shape)}:".encode())
        digest.update(value.detach().reshape(-1).view(torch.uint8).cpu().numpy())  # one tensor at a time on the host
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)}:".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"list {len(value)}:".encode())
        for item in value:
            _feed(digest, item)
    else:  # str, int, float, bool, None: repr is exact and tells the types apart
        text = repr(value).encode("utf-8", "surrogatepass")
        digest.update(f"{type(value).__name__} {len(text)}:".encode() + text)


def load(path):
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes), e.g. a copy that failed; use another copy")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} not found; train first, or point --out_dir at the run's folder") from None
    except IsADirectoryError:
        raise UserError(f"checkpoint {path} is a folder, not a file") from None
    except Exception as e:  # truncated, not a torch file, or holding objects that need code to load
        reason = (str(e).strip().splitlines() or ["no message"])[0][:160]
        raise UserError(f"checkpoint {path} is unreadable or corrupt ({type(e).__name__}: {reason})") from None
    found = checkpoint.get("format", "no format field") if isinstance(checkpoint, dict) else type(checkpoint).__name__
    if found == UNCHECKED_FORMAT:
        print(f"note: {path} is an {UNCHECKED_FORMAT} checkpoint, saved before checkpoints carried a checksum: "
              f"it loads unverified", file=sys.stderr)
    elif found != FORMAT:
        raise UserError(f"checkpoint {path} is not an {FORMAT} checkpoint ({found}); it was made by another program or version")
    elif checkpoint.get("checksum") != payload_checksum(checkpoint):
        raise UserError(f"checkpoint {path} is corrupt: its contents do not match the checksum saved with it "
                        f"(bytes changed on disk or in a copy); use another copy or an earlier checkpoint")
    return checkpoint


def load_model_state(model, checkpoint, key="model"):
    """Copy the checkpoint's weights (or those under key) into model; a shape mismatch is a user error."""
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in checkpoint[key].items()}
    expected = model.state_dict()
    for key, value in state.items():
        if key in expected and expected[key].shape != value.shape:
            raise UserError(f"checkpoint weight {key} has shape {tuple(value.shape)} but the model expects "
                            f"{tuple(expected[key].shape)}; the checkpoint is from a different model shape")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def model_from(checkpoint, dropout=None):
    """The GPT a checkpoint describes, with its weights; dropout replaces the saved rate unless None."""
    model_args = checkpoint["model_args"] | ({} if dropout is None else {"dropout": dropout})
    model = GPT(GPTConfig(**model_args))
    load_model_state(model, checkpoint)
    return model


def restore_training_state(checkpoint, optimizer, scaler, batch_generator, hessian_generator, rank, train_windows=None):
    """Optimizer, GradScaler and random states (and where train_windows, a data.ShuffledEpochs, was in
    its epoch), so the resumed run is the run that was saved."""
    try:
        load_optimizer_state(optimizer, checkpoint["optimizer"])
    except (ValueError, KeyError) as e:
        raise UserError(f"the checkpoint's optimizer state does not fit --optimizer ({e}); resume with the optimizer it was trained with") from None
    if checkpoint["scaler"] or not scaler.is_enabled():
        scaler.load_state_dict(checkpoint["scaler"])
    # else: a run saved without float16 goes on in float16: its GradScaler starts afresh, as a new run's does
    rng = checkpoint["rng"]
    batch_generator.set_state(rng["batches"])
    if "hessian" in rng:  # checkpoints from before the Hessian pass had a stream of its own lack it
        hessian_generator.set_state(rng["hessian"])
    if train_windows is not None and "train_windows" in rng:  # else (a run saved with sampling=random) a new epoch
        train_windows.load_state_dict(rng["train_windows"])
    if rank != 0:
        return  # only rank 0's process-local random states are saved; the others keep their own seeds
    random.setstate(_as_tuples(rng["python"]))
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        # one state per GPU of the saving machine; this one may have fewer (or more)
        for index, state in enumerate(rng["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)


def load_optimizer_state(optimizer, state):
    """optimizer.load_state_dict, keeping this optimizer's implementation settings (fused, foreach,
    capturable): a CPU checkpoint resumed on a GPU stays fused, a GPU one resumed on a CPU does not."""
    implementation = [{k: group[k] for k in OPTIMIZER_IMPLEMENTATION_KEYS if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, settings in zip(optimizer.param_groups, implementation):
        group.update(settings)
        if group.get("fused") or group.get("capturable"):  # these keep the step count on the device
            for p in group["params"]:
                if "step" in optimizer.state.get(p, {}):
                    optimizer.state[p]["step"] = optimizer.state[p]["step"].to(device=p.device, dtype=torch.float32)


def _as_tuples(value):
    """random.setstate wants the tuples that a save/load round trip may have made lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def tokenizer_of(checkpoint):
    """The tokenizer a checkpoint was trained with (checkpoints from before trained tokenizers: GPT-2's)."""
    try:
        return tok.from_spec(checkpoint.get("tokenizer") or {"kind": "gpt2"})
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"the checkpoint's tokenizer cannot be loaded: {e}") from None


def check_same_tokenizer(checkpoint, data_tokenizer, data_dir):
    """Resuming on data made with another tokenizer would train on ids that mean other text."""
    trained = tokenizer_of(checkpoint).sha256
    if trained != data_tokenizer.sha256:
        run = checkpoint.get("config")  # the run's flags, where the checkpoint recorded them
        trained_on = data_folder(run) if run else None
        raise UserError(f"the checkpoint was trained with another tokenizer than {data_dir}'s "
                        f"(sha256 {trained[:12]} vs {data_tokenizer.sha256[:12]}); use the data folder it was "
                        f"trained on" + (f": --data_dir={trained_on}" if trained_on else ""))


def pretrained_tokenizer(name_or_dir):
    """The tokenizer of transformers weights: a folder's own tokenizer.json, else GPT-2's."""
    path = os.path.join(name_or_dir, "tokenizer.json")
    try:
        return tok.read_tokenizer_file(path) if os.path.isfile(path) else tok.GPT2Tokenizer()
    except (FileNotFoundError, ValueError) as e:  # GPT-2's ranks not installed; a foreign tokenizer.json
        raise UserError(str(e)) from None


def check_gpt2_tokenizer(name_or_dir, data_tokenizer, data_dir):
    """Weights trained with one vocabulary read nonsense from ids of another."""
    weights_tokenizer = pretrained_tokenizer(name_or_dir)
    if (weights_tokenizer.eot_token, weights_tokenizer.token_bytes) != (data_tokenizer.eot_token, data_tokenizer.token_bytes):
        raise UserError(f"--init_from={name_or_dir} was trained with the {weights_tokenizer.kind} tokenizer "
                        f"({weights_tokenizer.n_vocab} tokens) but {data_dir} holds {data_tokenizer.kind} tokens "
                        f"({data_tokenizer.n_vocab}); prepare the data with that tokenizer "
                        f"(python prepare.py --tokenizer={'gpt2' if weights_tokenizer.kind == 'gpt2' else name_or_dir})")


def gpt2_model(name_or_dir, dropout):
    """GPT with GPT-2 weights from transformers: a hub name (downloaded when online) or a folder."""
    try:
        return GPT.from_pretrained(name_or_dir, dropout=dropout)
    except ImportError:
        raise UserError("init_from a GPT-2 model needs transformers: pip install transformers") from None
    except Exception as e:
        # a truncated or garbled weights file: safetensors and torch's zip reader have their own errors
        unreadable = isinstance(e, (OSError, ValueError)) or type(e).__name__ == "SafetensorError" or "PytorchStreamReader" in str(e)
        if not unreadable:
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"could not load GPT-2 weights {name_or_dir!r}: {reason}") from None

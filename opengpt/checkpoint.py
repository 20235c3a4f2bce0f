"""Checkpoints: what a training run saves, atomically, and how train.py and sample.py load it.

A checkpoint is plain data (tensors, numbers, strings, lists, dicts), so it loads with
torch.load(weights_only=True): opening someone else's checkpoint cannot run their code. It carries
a SHA-256 of its contents, checked on load: torch's own reader checks nothing, so bytes flipped on a
disk or in a copy would otherwise load as silently wrong weights and optimizer state. The checksum
is no signature, so the structure and sizes a checkpoint declares are checked against the tensors it
holds before anything is built (check_contents); transformers folders pass model_folder.py's checks.
"""
import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import random
import re
import shutil
import warnings

import numpy as np
import torch

from opengpt import tokenizer as tok
from opengpt.chat_format import CHAT_TOKENS, is_chat_tokenizer
from opengpt.cli import UserError
from opengpt.files import space_left, write_atomically
from opengpt.data import data_folder
from opengpt.model_folder import MAX_ROTARY_POSITIONS, check_model_folder
from opengpt.staged_folder import is_alive
from model import GPT, GPTConfig

FILENAME = "ckpt.pt"
BEST_FILENAME = "ckpt_best.pt"
FORMAT = "open-gpt-training/2"
# How an optimizer runs on this machine, not what it has learnt: load_state_dict would copy the saving
# machine's choice (a CPU run's foreach=True over a fused CUDA AdamW, which a GradScaler then trips on).
OPTIMIZER_IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable")


def process_rng_state():
    """This process's own random states (its dropout's among them): Python's, NumPy's, torch's on the
    CPU and, once CUDA is in use, on each GPU."""
    np_state = np.random.get_state()
    state = dict(python=random.getstate(), numpy=[np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
                 torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_process_rng_state(state):
    random.setstate(_as_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # one state per GPU of the saving machine; this one may have fewer (or more)
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def training_state(model, optimizer, scaler, model_args, iter_num, best_val_loss, config, batch_generator, tokenizer,
                   hessian_generator, train_windows=None, weight_average=None, chat=None, other_ranks=None):
    """Everything `init_from=resume` needs to continue the run exactly, and the tokenizer that
    sample.py and export.py need to turn its tokens into text without the data folder. With a
    weight_average (weight_average.py), "model" is the average and "trained_model" the weights trained.
    chat: a chat fine-tuning's record (its template, how the vocabulary grew: run_setup.chat_record).
    other_ranks: under torchrun, ranks 1, 2, ...'s process_rng_state, which this process (rank 0) lacks."""
    rng = process_rng_state() | dict(batches=batch_generator.get_state(), hessian=hessian_generator.get_state())
    if train_windows is not None:
        rng["train_windows"] = train_windows.state_dict()
    if other_ranks:
        rng["other_ranks"] = other_ranks
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
    ) | averaged | ({} if chat is None else {"chat": chat})


def save(state, path):
    """Write state and its checksum to path atomically; a full or read-only disk is a UserError,
    and the file that would have been replaced is left as it was."""
    state = state | {"checksum": payload_checksum(state)}
    _write(path, lambda temp_path: torch.save(state, temp_path))


def save_copy(path, copy_path):
    """copy_path: the checkpoint at path under a second name, replaced atomically, as save() would:
    a hard link where the filesystem has them (no second write, no space; save() replaces a file by
    renaming a new one over it, so the two names part at the next save of either), else a copy."""
    def link_or_copy(temp_path):
        try:
            os.link(path, temp_path)
        except OSError:
            shutil.copyfile(path, temp_path)
    _write(copy_path, link_or_copy)


def _write(path, write):
    remove_dead_temp_files(path)
    try:
        write_atomically(path, write)
    except OSError as e:
        full = f", {space_left(path)}" if e.errno == errno.ENOSPC else ""
        raise UserError(f"could not write checkpoint {path} ({e.strerror or e}{full}); "
                        f"any earlier {os.path.basename(path)} there is intact") from None
    except RuntimeError as e:  # torch's zip writer reports a failed write (a full disk) as RuntimeError
        if "inline_container" not in str(e) and "PytorchStreamWriter" not in str(e):
            raise
        raise UserError(f"could not write checkpoint {path} (the write failed, {space_left(path)}); "
                        f"any earlier {os.path.basename(path)} there is intact") from None


def remove_dead_temp_files(path):
    """The temp files (write_atomically's .<name>.tmp<pid>) of saves killed mid-write, each a
    checkpoint's size: only those whose process is gone, never one of a live save or a user's file."""
    folder, name = os.path.split(os.path.abspath(path))
    prefix = f".{name}.tmp"
    for entry in os.scandir(folder) if os.path.isdir(folder) else ():
        pid = entry.name[len(prefix):]
        if entry.name.startswith(prefix) and pid.isdigit() and entry.is_file(follow_symlinks=False) and not is_alive(int(pid)):
            with contextlib.suppress(OSError):
                os.remove(entry.path)


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
    if os.path.exists(path) and not os.path.isdir(path) and not os.path.isfile(path):  # reading a pipe would wait for ever
        raise UserError(f"checkpoint {path} is not a regular file (a pipe or a device); point --out_dir at the run's folder")
    try:
        with warnings.catch_warnings():  # torch warns of an old pickle before it refuses it: the line below says it
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} not found; train first, or point --out_dir at the run's folder") from None
    except IsADirectoryError:
        raise UserError(f"checkpoint {path} is a folder, not a file") from None
    except Exception as e:  # truncated, not a torch file, or holding objects that need code to load
        needs_code = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if needs_code:  # weights_only refused what only code could rebuild: nothing of it ran
            raise UserError(f"checkpoint {path} is unreadable or corrupt: it holds Python objects that need code to load "
                            f"({needs_code[1]}), which train.py never writes; nothing of it was run") from None
        reason = (str(e).strip().splitlines() or ["no message"])[0][:160]
        raise UserError(f"checkpoint {path} is unreadable or corrupt ({type(e).__name__}: {reason})") from None
    found = checkpoint.get("format", "no format field") if isinstance(checkpoint, dict) else type(checkpoint).__name__
    if found == "open-gpt-training/1":  # this project's own, before 82f78ca (2026-11-28): no checksum to trust
        raise UserError(f"checkpoint {path} is an open-gpt-training/1 checkpoint, from this project before 2026-11-28 "
                        f"(82f78ca), which this version does not load: export it with the version that wrote it (python "
                        f"export.py there), then sample or fine-tune the export here (--init_from=EXPORT_FOLDER)")
    if found != FORMAT:
        raise UserError(f"checkpoint {path} is not an {FORMAT} checkpoint ({found}); it was made by another program or version")
    elif checkpoint.get("checksum") != payload_checksum(checkpoint):
        raise UserError(f"checkpoint {path} is corrupt: its contents do not match the checksum saved with it "
                        f"(bytes changed on disk or in a copy); use another copy or an earlier checkpoint")
    check_contents(checkpoint, path)
    return checkpoint


def check_contents(checkpoint, path):
    """The structure and sizes a checkpoint declares, checked before anything is built from it: its
    checksum is no signature (anyone can recompute it), so a crafted model_args.n_embd=2**20 would
    otherwise make GPT() allocate terabytes before a weight is read."""
    def malformed(what):
        return UserError(f"checkpoint {path} is malformed: {what}; it was not written by train.py, or was edited")

    model_args = checkpoint.get("model_args")
    if not isinstance(model_args, dict):
        raise malformed(f"model_args is a {type(model_args).__name__}, not a dict")
    field_types = {field.name: field.type for field in dataclasses.fields(GPTConfig)}
    for key, value in model_args.items():
        if key not in field_types:
            raise malformed(f"model_args has an unknown key {key!r} (known: {', '.join(field_types)})")
        wanted = field_types[key]
        numeric = wanted is float and type(value) is int  # dropout=0 is a float's value
        if type(value) is not wanted and not numeric:  # type(), not isinstance: True is no block_size
            raise malformed(f"model_args {key}={value!r} should be {'an' if wanted is int else 'a'} {wanted.__name__}, "
                            f"not a {type(value).__name__}")
    try:
        config = GPTConfig(**model_args)
    except ValueError as e:  # GPTConfig's own checks: sizes positive, n_head divides n_embd, a known activation
        raise malformed(f"model_args: {e}") from None
    if config.rotary and config.block_size > MAX_ROTARY_POSITIONS:
        raise malformed(f"model_args block_size={config.block_size:,}, more than the {MAX_ROTARY_POSITIONS:,} positions that load")
    for key, types, wanted in (("iter_num", (int,), "an int"), ("best_val_loss", (int, float), "a number"),
                               ("config", (dict,), "a dict")):
        if checkpoint.get(key) is not None and type(checkpoint[key]) not in types:
            raise malformed(f"{key} is a {type(checkpoint[key]).__name__}, not {wanted}")
    check_weights_fit(checkpoint.get("model"), config, "model", malformed)
    if "trained_model" in checkpoint:  # the weights trained, where "model" is their average (weight_average.py)
        check_weights_fit(checkpoint["trained_model"], config, "trained_model", malformed)


def check_weights_fit(state, config, key, malformed):
    """Every tensor the model config describes is in state with its shape, and nothing else: compared
    against the model built on the meta device (shapes only, no memory), once the layer count is
    known to be the one the tensors hold."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise malformed(f"{key} is not a dict of named tensors")
    shapes = {k.removeprefix("_orig_mod.").removeprefix("module."): tuple(v.shape) for k, v in state.items()}
    layers = {int(m.group(1)) for name in shapes for m in [re.match(r"transformer\.h\.(\d+)\.", name)] if m}
    if layers != set(range(config.n_layer)):
        raise malformed(f"model_args declare n_layer={config.n_layer} but {key} holds {len(layers)} layers")
    embedding = shapes.get("transformer.wte.weight")
    if embedding != (config.vocab_size, config.n_embd):  # first, as it bounds the width of the meta model
        raise malformed(f"model_args declare vocab_size={config.vocab_size}, n_embd={config.n_embd} "
                        f"but {key}'s transformer.wte.weight is {embedding}")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    for name, shape in expected.items():
        if shapes.get(name, shape) != shape:
            raise malformed(f"model_args declare sizes {key} does not hold: {name} would be {shape}, the checkpoint has {shapes[name]}")
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise malformed(f"{key} does not fit model_args: missing {missing[:3]}, unexpected {unexpected[:3]}")


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


def restore_training_state(checkpoint, optimizer, scaler, batch_generator, hessian_generator, rank, train_windows=None,
                           world_size=1):
    """Optimizer, GradScaler and random states (and where train_windows, a data.ShuffledEpochs, was in
    its epoch), so the resumed run is the run that was saved. Each rank takes its own process's random
    states where the run had as many processes; else the ranks past 0 keep their own seeds."""
    try:
        load_optimizer_state(optimizer, checkpoint["optimizer"])
    except (ValueError, KeyError) as e:
        raise UserError(f"the checkpoint's optimizer state does not fit --optimizer ({e}); resume with the optimizer it was trained with") from None
    if checkpoint["scaler"] or not scaler.is_enabled():
        scaler.load_state_dict(checkpoint["scaler"])
    # else: a run saved without float16 goes on in float16: its GradScaler starts afresh, as a new run's does
    rng = checkpoint["rng"]
    batch_generator.set_state(rng["batches"])
    hessian_generator.set_state(rng["hessian"])
    if train_windows is not None and "train_windows" in rng:  # else (a run saved with sampling=random) a new epoch
        train_windows.load_state_dict(rng["train_windows"])
    if rank == 0:
        restore_process_rng_state(rng)
    elif len(rng.get("other_ranks", [])) == world_size - 1 > 0:  # not a run saved by another number of processes
        restore_process_rng_state(rng["other_ranks"][rank - 1])


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
    """The tokenizer a checkpoint was trained with; a trained BPE's regexes are probed as a file's are."""
    try:
        with tok.regex_panics_refused("it"):
            tokenizer = tok.from_spec(checkpoint.get("tokenizer"))
            if tokenizer.kind == "bpe":
                tok.probe_regexes(tokenizer)
        return tokenizer
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"the checkpoint's tokenizer cannot be loaded: {e}") from None


def check_finite_weights(checkpoint, path):
    """A run that diverged saved NaN or infinite weights: what is built from them is noise."""
    for name, tensor in checkpoint["model"].items():
        finite = torch.isfinite(tensor)
        if not finite.all():
            raise UserError(f"checkpoint {path} holds weights that are not finite ({(~finite).sum().item():,} of "
                            f"{tensor.numel():,} values of {name} are NaN or infinite): the run diverged; use a "
                            f"checkpoint saved before it did, or train again with a lower --learning_rate")


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
    """The tokenizer of transformers weights: a folder's own tokenizer.json, else GPT-2's, where
    the folder's vocabulary is GPT-2's (its size; its vocab.json, if any)."""
    check_not_a_file(name_or_dir)
    if os.path.isdir(name_or_dir):  # a folder that is no model says so before its tokenizer is guessed
        check_model_folder(name_or_dir)
    path = os.path.join(name_or_dir, tok.TOKENIZER_FILE)
    try:
        # lexists: a tokenizer.json that is a pipe or a dangling link is refused, not replaced by GPT-2's
        if os.path.lexists(path):
            return tok.read_tokenizer_file(path)
        gpt2 = tok.GPT2Tokenizer()
    except (FileNotFoundError, ValueError) as e:  # GPT-2's ranks not installed; a foreign tokenizer.json
        raise UserError(str(e)) from None
    if os.path.isdir(name_or_dir) and not has_gpt2_vocabulary(name_or_dir, gpt2):
        raise UserError(f"{name_or_dir} has no {tok.TOKENIZER_FILE}, and its vocabulary is not GPT-2's (its config.json's "
                        f"vocab_size or vocab.json differ); save its tokenizer there (tokenizer.save_pretrained)")
    return gpt2


def has_gpt2_vocabulary(folder, gpt2):
    """Whether a model folder without a tokenizer.json may be read with GPT-2's tokenizer: its
    config.json counts GPT-2's tokens or more (padded), and a vocab.json, if it has one, is GPT-2's."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            if json.load(f).get("vocab_size", gpt2.n_vocab) < gpt2.n_vocab:
                return False
        vocab_path = os.path.join(folder, "vocab.json")
        if not os.path.isfile(vocab_path):
            return True
        if os.path.getsize(vocab_path) > 100e6:  # GPT-2's is 1 MB
            return False
        with open(vocab_path, encoding="utf-8") as f:
            vocab = json.load(f)
    except (OSError, ValueError, AttributeError, TypeError):
        return False
    to_text = tok.bytes_to_unicode()
    return isinstance(vocab, dict) and all(vocab.get("".join(to_text[b] for b in gpt2.single_token_bytes(i))) == i
                                           for i in range(gpt2.n_vocab) if i != gpt2.eot_token)


def chat_tokens_added(weights_tokenizer, data_tokenizer):
    """[] when the data's tokenizer gives the same tokens as the weights' (the same ids for the same
    bytes, the same end of text); the chat template's tokens when it is the weights' plus those
    (chat_format.with_chat_tokens: ids n_vocab, n_vocab + 1); None when it is anything else."""
    n = weights_tokenizer.n_vocab
    same_start = (weights_tokenizer.eot_token == data_tokenizer.eot_token
                  and data_tokenizer.token_bytes[:n] == weights_tokenizer.token_bytes)
    if same_start and data_tokenizer.n_vocab == n:
        return []
    added = [data_tokenizer.special_token_id(text) for text in CHAT_TOKENS]
    if same_start and not is_chat_tokenizer(weights_tokenizer) and added == [n, n + 1] and data_tokenizer.n_vocab == n + 2:
        return list(CHAT_TOKENS)
    return None


def tokens_to_add(name_or_dir, weights_tokenizer, data_tokenizer, data_dir):
    """chat_tokens_added, where it is not None; weights trained with one vocabulary read nonsense
    from ids of another, so any other difference is a UserError naming both tokenizers."""
    added = chat_tokens_added(weights_tokenizer, data_tokenizer)
    if added is None:
        # a path that is no folder here (mistyped, or on another node) is taken for a hub name: say so
        missing = "" if os.path.isdir(name_or_dir) else (" (no folder of that name here, so a model on the Hugging Face "
                                                         "hub; if you meant a run's out_dir or a model folder, check the path)")
        raise UserError(f"--init_from={name_or_dir}{missing} was trained with the {weights_tokenizer.kind} tokenizer "
                        f"({weights_tokenizer.n_vocab} tokens) but {data_dir} holds {data_tokenizer.kind} tokens "
                        f"({data_tokenizer.n_vocab}); prepare the data with that tokenizer "
                        f"(python prepare.py --tokenizer={'gpt2' if weights_tokenizer.kind == 'gpt2' else name_or_dir}, "
                        f"or for chat data python prepare_chat.py --tokenizer_from={name_or_dir})")
    return added


def load_pretrained(out_dir):
    """The checkpoint of a run to start another from (fine-tuning): its weights must be finite."""
    path = os.path.join(out_dir, FILENAME)
    checkpoint = load(path)
    check_finite_weights(checkpoint, path)
    return checkpoint


def load_trained(path):
    """(checkpoint, its model in eval mode without dropout, its tokenizer) of a checkpoint file to sample
    or evaluate: its weights finite, and a row in the model for every id its tokenizer gives."""
    checkpoint = load(path)
    check_finite_weights(checkpoint, path)
    model, tokenizer = model_from(checkpoint, dropout=0.0).eval(), tokenizer_of(checkpoint)
    check_vocabulary_fits(model, tokenizer)
    return checkpoint, model, tokenizer


def check_vocabulary_fits(model, tokenizer):
    """A UserError unless every id the tokenizer gives has a row in the model: past its rows an id
    would index nothing (a crafted or edited checkpoint, weights beside a tokenizer of another model)."""
    if model.config.vocab_size < tokenizer.n_vocab:
        raise UserError(f"the model's vocabulary has {model.config.vocab_size} rows, fewer than its tokenizer's "
                        f"{tokenizer.n_vocab} tokens; the weights and the tokenizer do not belong together")


def is_run_folder(path):
    """Whether path is a training run's out_dir (it holds a ckpt.pt), not a transformers folder."""
    return os.path.isdir(path) and os.path.lexists(os.path.join(path, FILENAME))


def gpt2_model(name_or_dir, dropout):
    """GPT with GPT-2 weights from transformers: a hub name (downloaded when online) or a folder,
    which must pass model_folder.check_model_folder first (no code runs, no size is taken on trust)."""
    check_not_a_file(name_or_dir)
    try:
        if os.path.isdir(name_or_dir):
            check_model_folder(name_or_dir)
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


def check_not_a_file(name_or_dir):
    if os.path.isfile(name_or_dir):  # config.json or the weights themselves: transformers wants the folder
        raise UserError(f"--init_from={name_or_dir} is a file; give the folder that holds config.json and the "
                        f"weights (--init_from={os.path.dirname(name_or_dir) or '.'}), or a GPT-2 name")

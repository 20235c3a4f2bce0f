"""Bits per character of a trained model: on its val split, overall and per source of the corpus,
and on any text files named. Writes nothing.

    python eval.py --out_dir=out-tiny-zh-cpu
    python eval.py --out_dir=out --text=news.txt,poems.txt     # also each file's own bits per character
    python eval.py --out_dir=out --data_dir=data/other         # another data folder of the same tokenizer

The val split is read in consecutive windows, as train.py's evaluation reads it (all of them by
default); a text file is tokenized with the checkpoint's tokenizer as one document and every
character of it is predicted once.
"""
import math
import os
import sys

import torch

from configurator import parse_args
from opengpt import checkpoint as ckpt
from opengpt import hardware
from opengpt.cli import UserError, run
from opengpt.data import TokenData, data_folder
from opengpt.data_layout import prepare_command
from opengpt.training import evaluate_split

DEFAULTS = dict(
    out_dir="out",  # the run whose checkpoint (ckpt.pt) to evaluate
    data_dir="",  # the data folder whose val split to evaluate; default the one the run trained on
    text="",  # text files to evaluate too, comma-separated (UTF-8)
    max_batches=0,  # val batches to evaluate; 0 = the whole split
    batch_size=8,  # windows per forward pass
    device="auto",  # auto | cpu | cuda | cuda:N | mps
    dtype="auto",  # auto | float32 | bfloat16 | float16
)


def read_text(path):
    """A text file's contents; a missing, unreadable, non-UTF-8 or empty file is a UserError."""
    if os.path.isdir(path):
        raise UserError(f"--text: {path} is a folder; give text files, comma-separated")
    if os.path.exists(path) and not os.path.isfile(path):  # /dev/zero would fill the memory, a pipe wait
        raise UserError(f"--text: {path} is not a regular file (a pipe or a device); give text files")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"--text: {path} not found") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--text: {path} is not UTF-8 text (bad byte at offset {e.start})") from None
    except OSError as e:
        raise UserError(f"--text: cannot read {path} ({e.strerror or e})") from None
    if not text:
        raise UserError(f"--text: {path} is empty: nothing to evaluate")
    return text


@torch.no_grad()
def text_bits(model, tokenizer, text, batch_size, device, autocast):
    """Total bits of text under the model: the text as one document (after an <|endoftext|>, as
    documents follow one another in the data), read in consecutive windows of block_size targets."""
    tokens = torch.tensor([tokenizer.eot_token, *tokenizer.encode(text)])
    block = model.config.block_size
    windows = [tokens[s:s + block + 1] for s in range(0, len(tokens) - 1, block)]
    nats = 0.0
    full = [w for w in windows if len(w) == block + 1]
    batches = [torch.stack(full[i:i + batch_size]) for i in range(0, len(full), batch_size)]
    batches += [w[None] for w in windows if len(w) < block + 1]  # the last, shorter window
    for batch in batches:
        with autocast:
            losses = model.token_losses(batch[:, :-1].to(device), batch[:, 1:].to(device))
            nats += losses.cpu().double().sum().item()  # on the CPU: MPS has no float64
    return nats / math.log(2)


def evaluate_val(checkpoint, model, tokenizer, data_dir, batch_size, max_batches, device, autocast):
    """(the data folder, evaluate_split's numbers of its val split: overall and per source) for a
    loaded checkpoint's model; the folder must hold the checkpoint's tokenizer."""
    if not os.path.isdir(data_dir):  # TokenData's message would offer --dataset, which eval.py does not take
        raise UserError(f"data folder {data_dir} not found (a path relative to where the run was started, if it is the "
                        f"checkpoint's); name it with --data_dir")
    data = TokenData(data_dir, model.config.block_size)
    ckpt.check_same_tokenizer(checkpoint, data.load_tokenizer(), data_dir)
    return data, evaluate_split(model, data, "val", batch_size, max_batches, device, autocast,
                                torch.from_numpy(tokenizer.token_byte_lengths))


def main():
    cfg = parse_args(DEFAULTS, sys.argv[1:])
    for key in ("batch_size",):
        if cfg[key] <= 0:
            raise UserError(f"--{key} must be positive, got {cfg[key]}")
    if cfg["max_batches"] < 0:
        raise UserError(f"--max_batches must be zero or positive, got {cfg['max_batches']}")
    texts = {path: read_text(path) for path in filter(None, cfg["text"].split(","))}
    path = os.path.join(cfg["out_dir"], ckpt.FILENAME)
    checkpoint, model, tokenizer = ckpt.load_trained(path)
    run_config = checkpoint.get("config") or {}
    data_dir = cfg["data_dir"] or (data_folder(run_config) if "data_dir" in run_config else "")
    if not cfg["data_dir"] and texts and not os.path.isdir(data_dir):
        print(f"note: {data_dir or 'the run data folder'} not found: evaluating the text files only", file=sys.stderr)
        data_dir = ""
    elif not data_dir:
        raise UserError(f"{path} does not record the data folder it was trained on; name one with --data_dir")
    device = hardware.pick_device(cfg["device"])
    dtype = hardware.pick_dtype(cfg["dtype"], device)
    autocast = hardware.autocast_context(device, dtype)
    model.to(device)

    rows = []  # (what, targets, bits per character, bits per byte)
    if data_dir:
        data, val = evaluate_val(checkpoint, model, tokenizer, data_dir, cfg["batch_size"], cfg["max_batches"], device, autocast)
        rows.append((f"val of {data_dir}" + (" (assistant replies)" if data.chat else ""), val["tokens"], val["bpc"], val["bpb"]))
        rows += [(f"  {name}", s["tokens"], s["bpc"], s["bpb"]) for name, s in val.get("sources", {}).items()]
    for text_path, text in texts.items():
        bits = text_bits(model, tokenizer, text, cfg["batch_size"], device, autocast)
        rows.append((text_path, len(tokenizer.encode(text)), bits / len(text), bits / len(text.encode("utf-8"))))
    print(f"{path} (iter {checkpoint.get('iter_num')}), {device} {dtype}")
    width = max(len(what) for what, *_ in rows)
    print(f"{'':{width}}  {'tokens':>9}  {'bits/char':>9}  {'bits/byte':>9}")
    for what, tokens, bpc, bpb in rows:
        print(f"{what:{width}}  {tokens:>9,}  {bpc:>9.3f}  {bpb:>9.3f}")
    if data_dir and not data.chat and not data.sources["val"]:
        # folders prepared before meta.json recorded sources: the table is still right, only shorter
        print(f"(no per-source rows: {data_dir} was prepared before prepare.py recorded its sources; "
              f"run {prepare_command(data_dir)} again for them)")


if __name__ == "__main__":
    run(main)

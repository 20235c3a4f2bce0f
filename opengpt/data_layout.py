"""What a prepared data folder is called and holds: the one rule that prepare.py names its folders
by, and its inverse, the prepare.py command that writes a folder train.py cannot find.

Without torch (data.py has it), so prepare.py and its worker processes start fast.
"""
import json
import os

from opengpt.corpus import DEFAULT_CORPUS_NAME, EMBEDDED_CORPORA

SPLITS = ("train", "val")
DEFAULT_VOCAB_SIZE = 8192  # prepare.py's --vocab_size, whose folder takes no suffix
GPT2_SUFFIX, BPE_SUFFIX = "_gpt2", "_bpe"


def default_out(name, flags):
    """data/<name>, with a suffix for any tokenizer but the default (flags are prepare.py's
    --tokenizer and --vocab_size), so that the same corpus prepared with several tokenizers keeps one
    folder each: data/zh_default, data/zh_default_gpt2, data/zh_default_bpe4096."""
    return os.path.join("data", name + tokenizer_suffix(flags["tokenizer"], flags["vocab_size"]))


def tokenizer_suffix(tokenizer, vocab_size):
    if tokenizer == "gpt2":
        return GPT2_SUFFIX
    if tokenizer == "bpe":
        return "" if vocab_size == DEFAULT_VOCAB_SIZE else f"{BPE_SUFFIX}{vocab_size}"
    return "_" + os.path.basename(os.path.normpath(tokenizer)).removesuffix(".json")  # a tokenizer file's name


def embedded_corpus_flags(name):
    """The --corpus, --tokenizer and --vocab_size flags (a dict) whose default_out is data/<name>, or
    None when no embedded corpus's folder is named so."""
    for corpus in EMBEDDED_CORPORA:
        flags = tokenizer_flags(name.removeprefix(corpus)) if name.startswith(corpus) else None
        if flags is not None:
            return ({} if corpus == DEFAULT_CORPUS_NAME else {"corpus": corpus}) | flags
    return None


def tokenizer_flags(suffix):
    """The --tokenizer / --vocab_size flags (a dict) whose tokenizer_suffix is suffix, or None when
    only a tokenizer file's name gives it (the file's path is not in the name)."""
    if suffix == GPT2_SUFFIX:
        flags = {"tokenizer": "gpt2"}
    elif suffix.startswith(BPE_SUFFIX) and suffix[len(BPE_SUFFIX):].isdecimal():
        flags = {"vocab_size": int(suffix[len(BPE_SUFFIX):])}
    else:
        flags = {}
    given = {"tokenizer": "bpe", "vocab_size": DEFAULT_VOCAB_SIZE} | flags
    return flags if tokenizer_suffix(given["tokenizer"], given["vocab_size"]) == suffix else None


def prepare_command(data_dir):
    """The prepare.py command that writes data_dir when it is a folder prepare.py names itself for an
    embedded corpus (default_out: data/zh_default, data/zh_large, their _gpt2 and _bpe<N> siblings), or
    data/openwebtext of the GPT-2 configs."""
    name = os.path.basename(os.path.normpath(data_dir))
    flags = embedded_corpus_flags(name)
    if name == "openwebtext":  # the GPT-2 configs' dataset, from the hub (a download)
        return f"python prepare.py --hf_dataset=openwebtext --out={data_dir}"
    if flags is None:
        return f"python prepare.py --out={data_dir} with the flags that made it"
    command = "python prepare.py" + "".join(f" --{key}={value}" for key, value in flags.items())
    return command + ("" if os.path.normpath(data_dir) == os.path.join("data", name) else f" --out={data_dir}")


def read_meta(folder):
    """A data folder's meta.json as a dict, or None where it is missing, unreadable or no JSON object."""
    try:
        with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None

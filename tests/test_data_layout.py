"""opengpt/data_layout.py: the names prepare.py gives its folders, and the command that writes a
missing one (the inverse), both from one rule."""
import os

import pytest

import prepare
from configurator import parse_args
from opengpt.data_layout import DEFAULT_VOCAB_SIZE, default_out, prepare_command, tokenizer_flags, tokenizer_suffix


@pytest.mark.parametrize("tokenizer, vocab_size", [("bpe", DEFAULT_VOCAB_SIZE), ("bpe", 300), ("bpe", 12288), ("gpt2", DEFAULT_VOCAB_SIZE)])
def test_tokenizer_flags_invert_tokenizer_suffix(tokenizer, vocab_size):
    flags = tokenizer_flags(tokenizer_suffix(tokenizer, vocab_size))
    assert {"tokenizer": "bpe", "vocab_size": DEFAULT_VOCAB_SIZE} | flags == {"tokenizer": tokenizer, "vocab_size": vocab_size}


@pytest.mark.parametrize("suffix", ["_bpe8192", "_bpe", "_bpe12x", "_bpe٣", "_mine", "x"])
def test_a_suffix_no_flags_give_has_no_flags(suffix):
    """_bpe8192: the default size takes no suffix; _mine: a tokenizer file's name, its path lost."""
    assert tokenizer_flags(suffix) is None


def test_prepare_names_its_folders_by_this_rule():
    assert prepare.default_out is default_out
    assert prepare.DEFAULTS["vocab_size"] == DEFAULT_VOCAB_SIZE
    assert default_out("mine", dict(tokenizer="data/zh_default/tokenizer.json", vocab_size=1)) == os.path.join("data", "mine_tokenizer")


@pytest.mark.parametrize("flags", [[], ["--tokenizer=gpt2"], ["--vocab_size=300"], ["--corpus=zh_large"],
                                   ["--corpus=zh_large", "--tokenizer=gpt2"], ["--corpus=zh_large", "--vocab_size=300"]])
def test_the_command_for_a_folder_elsewhere_names_it_with_out(flags):
    cfg = parse_args(dict(prepare.DEFAULTS), flags)
    folder = default_out(cfg["corpus"], cfg)
    elsewhere = os.path.join("elsewhere", os.path.basename(folder))
    assert prepare_command(elsewhere) == " ".join(["python prepare.py", *flags, f"--out={elsewhere}"])
    assert prepare_command(folder) == " ".join(["python prepare.py", *flags])
    assert prepare_command(folder + os.sep) == " ".join(["python prepare.py", *flags])


def test_a_folder_of_another_corpus_asks_for_the_flags_that_made_it():
    assert prepare_command("data/zh_defaultish") == "python prepare.py --out=data/zh_defaultish with the flags that made it"
    assert prepare_command("data/openwebtext") == "python prepare.py --hf_dataset=openwebtext --out=data/openwebtext"
    assert prepare_command("data/zh_default_mine") == "python prepare.py --out=data/zh_default_mine with the flags that made it"
    assert prepare_command("data/zh_larger") == "python prepare.py --out=data/zh_larger with the flags that made it"


def test_every_embedded_corpus_is_named_by_its_folder():
    """prepare.py --corpus=NAME writes data/NAME (the corpus's own name), which the inverse reads back."""
    from opengpt import corpus
    assert corpus.EMBEDDED_CORPORA["zh_default"] is corpus.default_corpus
    for name in corpus.EMBEDDED_CORPORA:
        assert prepare_command(os.path.join("data", name)) == "python prepare.py" + ("" if name == "zh_default" else f" --corpus={name}")

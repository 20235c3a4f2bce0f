"""opengpt/data.py reads one meta.json format, prepare.py's own: anything else (a meta.json without
its split counts or its tokenizer record, as no released prepare.py wrote) is one line asking to
rerun prepare.py."""
import json
import shutil

import pytest

from conftest import TINY_MODEL_ARGS, assert_user_error, run_script
from opengpt.cli import UserError
from opengpt.data import TokenData


def edited_copy(tiny_data, folder, edit):
    shutil.copytree(tiny_data, folder)
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    edit(meta)
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return folder


def test_prepare_py_s_meta_json_is_read(tiny_data, tiny_bpe_data):
    for folder in (tiny_data, tiny_bpe_data):
        data = TokenData(str(folder), block_size=16)
        assert data.load_tokenizer().n_vocab == data.vocab_size
        assert data.split_counts["val"]["tokens"] == len(data.tokens["val"])


@pytest.mark.parametrize("edit, words", [
    (lambda meta: meta.pop("splits"), ["KeyError: 'splits'"]),
    (lambda meta: meta["splits"]["val"].pop("tokens"), ["KeyError: 'tokens'"]),
    (lambda meta: meta.pop("tokenizer"), ["KeyError: 'tokenizer'"]),
    (lambda meta: meta.update(tokenizer="gpt2"), ["TypeError"]),
    (lambda meta: meta["tokenizer"].pop("sha256"), ["KeyError: 'sha256'"]),
    (lambda meta: meta["tokenizer"].update(kind="sentencepiece"), ["ValueError"]),
])
def test_a_meta_json_of_another_format_asks_to_rerun_prepare(tiny_data, tmp_path, edit, words):
    folder = edited_copy(tiny_data, tmp_path / "data", lambda meta: (meta.update(source="my corpus.txt"), edit(meta)))
    with pytest.raises(UserError) as error:
        TokenData(str(folder), block_size=16)
    message = str(error.value)
    assert "\n" not in message
    # the flags that made it, not the bare command, which would put the embedded corpus in a folder of the user's
    rebuild = f"rerun python prepare.py --out={folder} with the flags that made it (its meta.json records the source: my corpus.txt)"
    for word in ["meta.json is damaged or from another version of prepare.py", *words, rebuild]:
        assert word in message, (word, message)


def test_a_trained_tokenizer_s_record_must_name_its_file(tiny_bpe_data, tmp_path):
    folder = edited_copy(tiny_bpe_data, tmp_path / "data", lambda meta: meta["tokenizer"].pop("file"))
    with pytest.raises(UserError, match="KeyError: 'file'"):
        TokenData(str(folder), block_size=16)


def test_train_py_refuses_it_in_one_line(tiny_data, tmp_path):
    folder = edited_copy(tiny_data, tmp_path / "data", lambda meta: meta.pop("splits"))
    result = run_script("train.py", f"--data_dir={folder}", f"--out_dir={tmp_path / 'out'}", *TINY_MODEL_ARGS, "--max_iters=1")
    assert_user_error(result, "meta.json is damaged or from another version of prepare.py", "rerun python prepare.py")
    assert not (tmp_path / "out").exists()

import json
import os
import re

import numpy as np
import pytest

import prepare
from conftest import assert_user_error, run_script, tiny_documents
from tokenizer import EOT_TOKEN, gpt2_encoding


def decoded_documents(bin_path):
    tokens = np.fromfile(bin_path, dtype=np.uint16).tolist()
    encoding = gpt2_encoding()
    docs, current = [], []
    for t in tokens:
        if t == EOT_TOKEN:
            docs.append(encoding.decode(current))
            current = []
        else:
            current.append(t)
    assert current == [], "every document ends with <|endoftext|>"
    return docs


def prepare_ok(*args):
    result = run_script("prepare.py", *args)
    assert result.returncode == 0, result.stderr
    return result


def test_decoding_the_splits_gives_back_exactly_the_documents(tmp_path):
    docs = tiny_documents(300, seed=1)
    source = tmp_path / "in.txt"
    # blank lines and stray whitespace are not documents
    source.write_text("\n\n".join(f"  {d}\u3000 " for d in docs) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    prepare_ok(f"--input={source}", f"--out={out}")
    train, val = decoded_documents(out / "train.bin"), decoded_documents(out / "val.bin")
    defaults = prepare.DEFAULTS
    train_idx, val_idx = prepare.split_documents(len(docs), defaults["val_fraction"], defaults["min_val_docs"], defaults["seed"])
    assert train == [docs[i] for i in train_idx]
    assert val == [docs[i] for i in val_idx]


def test_meta_counts_match_the_files(tmp_path):
    docs = tiny_documents(250, seed=2)
    source = tmp_path / "in.txt"
    source.write_text("\n".join(docs), encoding="utf-8")
    out = tmp_path / "out"
    prepare_ok(f"--input={source}", f"--out={out}")
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"
    for split in ("train", "val"):
        split_docs = decoded_documents(out / f"{split}.bin")
        counts = meta["splits"][split]
        assert counts["documents"] == len(split_docs)
        assert counts["characters"] == sum(map(len, split_docs))
        assert counts["bytes"] == sum(len(d.encode("utf-8")) for d in split_docs)
        assert counts["tokens"] * 2 == os.path.getsize(out / f"{split}.bin")


def test_split_is_by_document_and_deterministic_for_a_seed():
    a = prepare.split_documents(1000, 0.005, 200, seed=7)
    b = prepare.split_documents(1000, 0.005, 200, seed=7)
    c = prepare.split_documents(1000, 0.005, 200, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])
    train, val = a
    assert len(val) == 200 and len(train) == 800 and not set(train) & set(val)


def test_validation_set_is_never_tiny():
    assert len(prepare.split_documents(100_000, 0.005, 200, seed=0)[1]) == 500  # 0.5% of documents
    assert len(prepare.split_documents(10_000, 0.005, 200, seed=0)[1]) == 200  # at least 200
    assert len(prepare.split_documents(100, 0.005, 200, seed=0)[1]) == 50  # at most half a small corpus


def test_jsonl_and_folders_are_read(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("第一篇\n第二篇\n", encoding="utf-8")
    (folder / "sub" / "b.jsonl").write_text(
        json.dumps({"text": "第三篇"}, ensure_ascii=False) + "\n" + json.dumps({"text": "第四篇"}, ensure_ascii=False) + "\n",
        encoding="utf-8")
    (folder / "ignored.csv").write_text("x,y\n", encoding="utf-8")
    assert prepare.input_documents(str(folder), "text") == ["第一篇", "第二篇", "第三篇", "第四篇"]


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path):
    """U+2028, U+2029 and U+0085 are legal inside a JSON string; only "\\n" ends a JSONL record."""
    texts = ["第一行\u2028第二行", "段落\u2029段落", "下一行\x85字符"]
    source = tmp_path / "a.jsonl"
    source.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    assert prepare.input_documents(str(source), "text") == [prepare.normalise(t) for t in texts]


def test_hugging_face_dataset_from_a_local_folder(tmp_path):
    pytest.importorskip("datasets", reason="datasets is in requirements-test.txt")
    folder = tmp_path / "hf_corpus"
    folder.mkdir()
    docs = tiny_documents(60, seed=3)
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"text": d}, ensure_ascii=False) for d in docs), encoding="utf-8")
    out = tmp_path / "out"
    prepare_ok(f"--hf_dataset={folder}", f"--out={out}")
    assert sorted(decoded_documents(out / "train.bin") + decoded_documents(out / "val.bin")) == sorted(docs)


def test_people_daily_tags_are_removed():
    assert prepare.untag_people_daily_line("迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  ——/w") == "迈向充满希望的新世纪——"
    assert prepare.untag_people_daily_line("ＡＰＥＣ/nx  会议/n  Windows/nx  98/m") == "ＡＰＥＣ会议Windows 98"


def test_default_corpus_has_no_tag_debris():
    people_daily = prepare.people_daily_documents()
    sanguo = prepare.sanguo_documents()
    assert len(people_daily) > 19_000 and len(sanguo) > 1_500
    tag = re.compile(r"/[A-Za-z]{1,3}(\s|$)")
    assert not [d for d in people_daily if tag.search(d)][:3]
    assert sanguo[0].startswith("第一回") and all("\u3000" not in d and "\t" not in d for d in sanguo)


@pytest.mark.parametrize("content, words", [
    ("", ["no text"]),
    ("\n \n\u3000\n", ["no text"]),
])
def test_empty_input_is_an_error_and_writes_nothing(tmp_path, content, words):
    source = tmp_path / "empty.txt"
    source.write_text(content, encoding="utf-8")
    out = tmp_path / "out"
    assert_user_error(run_script("prepare.py", f"--input={source}", f"--out={out}"), *words)
    assert not out.exists()


def test_non_utf8_input_is_an_error_and_writes_nothing(tmp_path):
    source = tmp_path / "gbk.txt"
    source.write_bytes("中文文本\n".encode("gbk"))
    out = tmp_path / "out"
    assert_user_error(run_script("prepare.py", f"--input={source}", f"--out={out}"), "not UTF-8", str(source))
    assert not out.exists()


def test_missing_input_is_an_error(tmp_path):
    assert_user_error(run_script("prepare.py", f"--input={tmp_path / 'nope.txt'}"), "not found")

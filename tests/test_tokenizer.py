import hashlib
import json
import subprocess
import sys

import pytest

from opengpt import tokenizer
from conftest import REPO, assert_user_error, run_script, tiny_documents

AWKWARD_TEXTS = [
    "滚滚长江东逝水，浪花淘尽英雄。",
    "emoji 😀👍🏽🇨🇳 and ZWJ 👩‍👩‍👧",
    "CJK Extension B: 𠀀𠀁𪚥𫝀",
    "全角：ＡＢＣ１２３，！？\u3000半角 abc 123",
    "mixed Latin café naïve it's GPT-2's 2024年",
    "lines\nand\n\n\ttabs\t\tand  double  spaces   \r\n",
    "<|endoftext|> is text here, not a token",
    "\u2028\u2029\u0085\x00\x1b[0m control and separators",
]


def small_bpe(vocab_size=400):
    return tokenizer.train_bpe(tiny_documents(300, seed=0), vocab_size)


@pytest.fixture(scope="module", params=["gpt2", "bpe", "bpe_from_file"])
def any_tokenizer(request, tmp_path_factory):
    if request.param == "gpt2":
        return tokenizer.GPT2Tokenizer()
    trained = small_bpe()
    if request.param == "bpe":
        return trained
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(trained.json_text, encoding="utf-8")
    return tokenizer.read_tokenizer_file(str(path))


@pytest.mark.parametrize("text", AWKWARD_TEXTS)
def test_awkward_text_round_trips_exactly(any_tokenizer, text):
    ids = any_tokenizer.encode(text)
    assert any_tokenizer.decode_bytes(ids) == text.encode("utf-8")
    assert any_tokenizer.eot_token not in ids  # text spelling <|endoftext|> never becomes the token
    assert sum(any_tokenizer.token_byte_lengths[ids]) == len(text.encode("utf-8"))


def test_gpt2_encoding_matches_known_ids_offline():
    gpt2 = tokenizer.GPT2Tokenizer()
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.n_vocab == 50257 and gpt2.eot_token == 50256
    assert len(gpt2.encode("滚滚长江东逝水")) > 7  # GPT-2's byte-level BPE spends several tokens per CJK character


def test_trained_bpe_has_eot_bytes_then_merges():
    bpe = small_bpe()
    assert bpe.n_vocab == 400 and bpe.eot_token == 0 and bpe.token_bytes[0] == b""
    assert sorted(bpe.token_bytes[1:257]) == [bytes([b]) for b in range(256)]
    assert all(len(b) >= 2 for b in bpe.token_bytes[257:])
    assert len(bpe.encode("滚滚长江东逝水")) < len(tokenizer.GPT2Tokenizer().encode("滚滚长江东逝水"))


def test_training_is_deterministic_across_processes(tmp_path):
    """Same corpus and size: the same tokenizer.json, byte for byte, whatever the hash seed."""
    code = ("import sys, conftest; from opengpt import tokenizer; "
            "sys.stdout.write(tokenizer.train_bpe(conftest.tiny_documents(300, seed=0), 400).json_text)")
    digests = set()
    for hash_seed in ("1", "2"):
        result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                                env={"PYTHONPATH": f"{REPO}:{REPO}/tests", "PYTHONHASHSEED": hash_seed, "PATH": ""})
        digests.add(hashlib.sha256(result.stdout.encode()).hexdigest())
    assert len(digests) == 1


def test_vocab_size_limits():
    with pytest.raises(tokenizer.TokenizerError, match="too small"):
        tokenizer.train_bpe(["甲乙丙丁"] * 10, 257)
    with pytest.raises(tokenizer.TokenizerError, match="too large for this corpus"):
        tokenizer.train_bpe(["甲乙丙丁"] * 10, 5000)


def test_ranks_with_wrong_checksum_are_refused(tmp_path):
    fake = tmp_path / "gpt2.tiktoken"
    fake.write_bytes(b"IQ== 0\n")
    with pytest.raises(ValueError, match="sha256"):
        tokenizer.load_ranks(str(fake))


def test_tokenizer_trained_on_train_split_only(tmp_path):
    """A word that only val documents hold must not become one token."""
    import prepare
    docs = tiny_documents(200, seed=5)
    defaults = prepare.DEFAULTS
    split = prepare.DocumentSplit(len(docs), defaults["val_fraction"], 20, defaults["seed"])
    for i in range(len(docs)):
        if split.is_val(i):
            docs[i] = "魑魅魍魉" * 5 + docs[i]
    source = tmp_path / "in.txt"
    source.write_text("\n".join(docs), encoding="utf-8")
    out = tmp_path / "out"
    assert run_script("prepare.py", f"--input={source}", f"--out={out}", "--vocab_size=400", "--min_val_docs=20").returncode == 0
    trained = tokenizer.read_tokenizer_file(str(out))
    assert len(trained.encode("魑魅魍魉")) >= 4 * 2  # never merged: 3 UTF-8 bytes per character, no pairs learnt
    # the control: the same word in train documents is learnt
    control = tokenizer.train_bpe(docs, 400)
    assert len(control.encode("魑魅魍魉")) <= 2


@pytest.mark.parametrize("content, words", [
    ("{not json", ["is not JSON"]),
    (json.dumps({"model": {"type": "WordPiece", "vocab": {"[UNK]": 0, "[SEP]": 1}, "unk_token": "[UNK]"}}),
     ["is not a Hugging Face tokenizer.json"]),
])
def test_unusable_tokenizer_files_are_one_line_errors(tmp_path, content, words):
    bad = tmp_path / "tokenizer.json"
    bad.write_text(content, encoding="utf-8")
    source = tmp_path / "in.txt"
    source.write_text("\n".join(tiny_documents(50)), encoding="utf-8")
    out = tmp_path / "out"
    assert_user_error(run_script("prepare.py", f"--input={source}", f"--out={out}", f"--tokenizer={bad}"), *words)
    assert not out.exists()


def test_a_non_byte_level_tokenizer_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    wordpiece.train_from_iterator(tiny_documents(50), trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[SEP]"]))
    with pytest.raises(tokenizer.TokenizerError, match="byte-level"):
        tokenizer.BPETokenizer(wordpiece.to_str())


def test_a_tokenizer_with_holes_in_its_ids_counts_to_its_highest_id():
    """The vocabulary's size is the highest id + 1, so every token the file can give fits the model
    (its count would not); a file of mostly holes is refused in a line."""
    def moved(to):  # the trained file with its highest id moved to `to`
        spec = json.loads(small_bpe().json_text)
        vocab = spec["model"]["vocab"]
        vocab[max(vocab, key=vocab.get)] = to
        return tokenizer.BPETokenizer(json.dumps(spec, ensure_ascii=False))

    trained = small_bpe()
    gapped = moved(trained.n_vocab + 99)
    assert gapped.n_vocab == trained.n_vocab + 100
    text = "".join(tiny_documents(300, seed=0))  # what it was trained on uses its last merge
    ids = gapped.encode(text)
    assert gapped.n_vocab - 1 in ids and gapped.decode_bytes(ids) == text.encode("utf-8")
    with pytest.raises(tokenizer.TokenizerError, match="mostly holes; number them from 0 without gaps"):
        moved(70_000)


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(tokenizer.TokenizerError, match="not found"):
        tokenizer.read_tokenizer_file(str(tmp_path / "nope.json"))

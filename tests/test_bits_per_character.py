"""train.py reports val bits per character and per byte; both are checked here against counts made
by hand, and the tokenizer travels with the checkpoint and is checked against the data."""
import json
import math
import shutil
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from conftest import TINY_MODEL_ARGS, assert_user_error, read_events, run_script
from opengpt.cli import UserError
from opengpt.data import TokenData
from model import GPT, GPTConfig
from opengpt.tokenizer import EOT_TOKEN, gpt2_encoding
from opengpt.training import evaluate


def test_bits_per_character_of_a_uniform_model_by_hand(tiny_data):
    """A model whose head is zero predicts every one of the V padded ids with probability 1/V: each
    target costs log2(V) bits. Bytes are counted with tiktoken's own decoder, characters from the
    documents themselves."""
    block = 16
    data = TokenData(str(tiny_data), block)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=block, vocab_size=data.padded_vocab_size, dropout=0.0))
    with torch.no_grad():
        model.lm_head.weight.zero_()
    cfg = dict(val_full_split=True, eval_iters=2, batch_size=4)
    byte_lengths = torch.from_numpy(data.load_tokenizer().token_byte_lengths)
    val = evaluate(model, data, cfg, "cpu", nullcontext(), byte_lengths)["val"]

    tokens = np.fromfile(tiny_data / "val.bin", dtype=np.uint16)
    targets = np.concatenate([tokens[s + 1:s + 1 + block] for s in range(0, len(tokens) - block, block)])
    n_eot = int((targets == EOT_TOKEN).sum())
    n_bytes = len(gpt2_encoding().decode_bytes([int(t) for t in targets if t != EOT_TOKEN])) + n_eot
    documents = gpt2_encoding().decode(tokens.tolist()).split("<|endoftext|>")[:-1]
    chars = sum(map(len, documents)) + len(documents)  # each document end counts as one character...
    doc_bytes = sum(len(d.encode("utf-8")) for d in documents) + len(documents)  # ...and one byte
    bits = len(targets) * math.log2(data.padded_vocab_size)
    assert val["loss"] == pytest.approx(math.log(data.padded_vocab_size), rel=1e-6)
    assert val["bpb"] == pytest.approx(bits / n_bytes, rel=1e-6)
    assert val["bpc"] == pytest.approx(bits / n_bytes * doc_bytes / chars, rel=1e-6)


def test_every_evaluation_logs_bits_per_character(tiny_bpe_data, tmp_path):
    out = tmp_path / "run"
    result = run_script("train.py", f"--data_dir={tiny_bpe_data}", f"--out_dir={out}", *TINY_MODEL_ARGS,
                        "--max_iters=20", "--lr_decay_iters=20", "--warmup_iters=2", "--eval_interval=10",
                        "--eval_iters=2", "--learning_rate=1e-2", "--tensorboard_log=True")
    assert result.returncode == 0, result.stderr
    evals = read_events(out, "eval")
    assert [e["iter"] for e in evals] == [0, 10, 20]
    assert evals[-1]["val_bpc"] < evals[0]["val_bpc"] and all(e["val_bpb"] > 0 for e in evals)
    assert f"val {evals[-1]['val_bpc']:.3f} bits/char" in result.stdout
    assert list((out / "tensorboard").iterdir())


@pytest.fixture(scope="module")
def bpe_run(tiny_bpe_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe_run")
    result = run_script("train.py", f"--data_dir={tiny_bpe_data}", f"--out_dir={out}", *TINY_MODEL_ARGS,
                        "--max_iters=30", "--lr_decay_iters=30", "--warmup_iters=2", "--eval_interval=30",
                        "--eval_iters=1", "--learning_rate=1e-2")
    assert result.returncode == 0, result.stderr
    return out


def test_checkpoint_samples_with_its_own_tokenizer_without_the_data_folder(tiny_bpe_data, bpe_run, tmp_path):
    checkpoint = torch.load(bpe_run / "ckpt.pt", weights_only=True)  # plain data, tokenizer included
    assert checkpoint["tokenizer"]["kind"] == "bpe"
    assert checkpoint["tokenizer"]["json"] == (tiny_bpe_data / "tokenizer.json").read_text(encoding="utf-8")
    moved = tmp_path / "run"
    shutil.copytree(bpe_run, moved)
    result = run_script("sample.py", f"--out_dir={moved}", "--start=滚滚长江", "--num_samples=1",
                        "--max_new_tokens=20", "--device=cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("滚滚长江") and "\ufffd" not in result.stdout


def test_resume_on_data_from_another_tokenizer_is_one_line(tiny_data, tiny_bpe_data, bpe_run):
    result = run_script("train.py", f"--data_dir={tiny_data}", f"--out_dir={bpe_run}", *TINY_MODEL_ARGS,
                        "--init_from=resume", "--max_iters=31")
    assert_user_error(result, "another tokenizer", f"--data_dir={tiny_bpe_data}")


def test_gpt2_weights_on_data_with_another_vocabulary_is_one_line(tiny_bpe_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50257, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2-tiny")
    result = run_script("train.py", f"--data_dir={tiny_bpe_data}", f"--out_dir={tmp_path / 'out'}", *TINY_MODEL_ARGS,
                        f"--init_from={tmp_path / 'gpt2-tiny'}", "--max_iters=1")
    assert_user_error(result, "gpt2 tokenizer", "--tokenizer=gpt2")


def test_a_mistyped_run_folder_as_init_from_is_named_as_missing(tiny_bpe_data, tmp_path):
    """A path that is no folder here is taken for a hub name, with GPT-2's tokenizer: the message says so
    beside GPT-2's fix. An empty folder is no model folder, said before any tokenizer is guessed."""
    typo = tmp_path / "out-typo"
    for init_from, words in ((typo, [f"--init_from={typo} (no folder of that name here, so a model on the Hugging Face hub; "
                                     "if you meant a run's out_dir or a model folder, check the path)", "--tokenizer=gpt2"]),
                             (tmp_path, [f"{tmp_path} has no config.json"])):
        result = run_script("train.py", f"--data_dir={tiny_bpe_data}", f"--out_dir={tmp_path / 'out'}", *TINY_MODEL_ARGS,
                            f"--init_from={init_from}", "--max_iters=1")
        assert_user_error(result, *words)


def test_data_folder_whose_tokenizer_was_replaced_is_one_line(tiny_bpe_data, tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(tiny_bpe_data, folder)
    text = (folder / "tokenizer.json").read_text(encoding="utf-8")
    (folder / "tokenizer.json").write_text(json.dumps(json.loads(text)), encoding="utf-8")  # same content, other bytes
    result = run_script("train.py", f"--data_dir={folder}", f"--out_dir={tmp_path / 'out'}", *TINY_MODEL_ARGS, "--max_iters=1")
    assert_user_error(result, "tokenizer is not the one", "rerun python prepare.py")


def two_source_copy(tiny_bpe_data, folder, n_first_documents):
    """tiny_bpe_data with its val split recorded as two sources: its first n_first_documents documents
    "news", the rest "novel", each span's documents, characters and bytes counted here by hand."""
    shutil.copytree(tiny_bpe_data, folder)
    tokenizer = TokenData(str(folder), 16).load_tokenizer()
    tokens = np.fromfile(folder / "val.bin", dtype=np.uint16)
    ends = np.flatnonzero(tokens == tokenizer.eot_token) + 1  # each document ends with its <|endoftext|>
    cut = int(ends[n_first_documents - 1])

    def span(name, start, end):
        bounds = [start, *(e for e in ends if start < e <= end)]
        documents = [tokenizer.decode(tokens[a:b - 1].tolist()) for a, b in zip(bounds, bounds[1:])]
        return dict(source=name, start=start, end=end, documents=len(documents), characters=sum(map(len, documents)),
                    bytes=sum(len(d.encode("utf-8")) for d in documents))
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    meta["splits"]["val"]["sources"] = [span("news", 0, cut), span("novel", cut, len(tokens))]
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return folder, tokens, cut, meta["splits"]["val"]["sources"]


def test_bits_per_character_of_each_source_by_hand(tiny_bpe_data, tmp_path):
    """Per-token losses from the full logits (log-softmax by hand), each target given to the source
    whose span holds it (windows cross the boundary), each source's bits per byte scaled by its own
    bytes per character; the overall numbers do not change."""
    block = 16
    folder, tokens, cut, spans = two_source_copy(tiny_bpe_data, tmp_path / "data", 7)
    data = TokenData(str(folder), block)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=block, vocab_size=data.padded_vocab_size, dropout=0.0))
    model.eval()
    byte_lengths = data.load_tokenizer().token_byte_lengths
    cfg = dict(val_full_split=True, eval_iters=2, batch_size=4)
    val = evaluate(model, data, cfg, "cpu", nullcontext(), torch.from_numpy(byte_lengths))["val"]
    plain = evaluate(model, TokenData(str(tiny_bpe_data), block), cfg, "cpu", nullcontext(), torch.from_numpy(byte_lengths))["val"]

    starts = np.arange(0, len(tokens) - block, block)
    assert any(s + 1 < cut <= s + block for s in starts)  # a window crosses from one source into the other
    x = torch.tensor(np.stack([tokens[s:s + block] for s in starts]).astype(np.int64))
    targets = np.stack([tokens[s + 1:s + 1 + block] for s in starts]).astype(np.int64)
    positions = starts[:, None] + 1 + np.arange(block)
    with torch.no_grad():
        logits = model.full_logits(x).double()
    log_probs = logits - logits.exp().sum(dim=-1, keepdim=True).log()
    nats = -log_probs.gather(-1, torch.from_numpy(targets).unsqueeze(-1)).squeeze(-1).numpy()
    for name, in_span in (("news", positions < cut), ("novel", positions >= cut)):
        span = next(s for s in spans if s["source"] == name)
        bits_per_byte = nats[in_span].sum() / math.log(2) / byte_lengths[targets[in_span]].sum()
        per_char = (span["bytes"] + span["documents"]) / (span["characters"] + span["documents"])
        assert val["sources"][name]["tokens"] == int(in_span.sum())
        assert val["sources"][name]["bpb"] == pytest.approx(bits_per_byte, rel=1e-6)
        assert val["sources"][name]["bpc"] == pytest.approx(bits_per_byte * per_char, rel=1e-6)
    assert val["bpc"] == pytest.approx(plain["bpc"], rel=1e-12) and val["loss"] == pytest.approx(nats.mean(), rel=1e-6)


def test_a_run_on_two_sources_logs_each_source(tiny_bpe_data, tmp_path):
    folder, *_ = two_source_copy(tiny_bpe_data, tmp_path / "data", 7)
    out = tmp_path / "run"
    result = run_script("train.py", f"--data_dir={folder}", f"--out_dir={out}", *TINY_MODEL_ARGS, "--max_iters=2",
                        "--lr_decay_iters=2", "--warmup_iters=1", "--eval_interval=2", "--eval_iters=1", "--val_full_split=True")
    assert result.returncode == 0, result.stderr
    last = read_events(out, "eval")[-1]
    assert set(last["val_sources"]) == {"news", "novel"} and all(s["tokens"] > 0 for s in last["val_sources"].values())
    assert (f"by source (bits/char): news {last['val_sources']['news']['bpc']:.3f}, "
            f"novel {last['val_sources']['novel']['bpc']:.3f}") in result.stdout


def test_sources_that_do_not_cover_the_split_are_refused_in_one_line(tiny_bpe_data, tmp_path):
    folder, *_ = two_source_copy(tiny_bpe_data, tmp_path / "data", 7)
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    meta["splits"]["val"]["sources"][1]["start"] += 1
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(UserError, match="do not cover its tokens back to back") as error:
        TokenData(str(folder), 16)
    assert "\n" not in str(error.value)

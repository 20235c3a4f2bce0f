"""eval.py: a checkpoint's val bits per character, overall and per source, and each named text
file's (checked by hand against full logits); it writes nothing, and bad input is one line."""
import importlib
import math
import os

import pytest
import torch

from conftest import TINY_MODEL_ARGS, assert_user_error, read_events, run_script
from opengpt import checkpoint as ckpt
from test_bits_per_character import two_source_copy

TEXT = "滚滚长江东逝水，浪花淘尽英雄。是非成败转头空，青山依旧在，几度夕阳红。\n白发渔樵江渚上，惯看秋月春风。"


@pytest.fixture(scope="module")
def two_source_run(tiny_bpe_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_run")
    folder, *_ = two_source_copy(tiny_bpe_data, root / "data", 7)
    out = root / "run"
    result = run_script("train.py", f"--data_dir={folder}", f"--out_dir={out}", *TINY_MODEL_ARGS, "--max_iters=10",
                        "--lr_decay_iters=10", "--warmup_iters=1", "--eval_interval=10", "--eval_iters=1",
                        "--val_full_split=True", "--learning_rate=1e-2")
    assert result.returncode == 0, result.stderr
    return out


def test_eval_prints_val_bits_per_character_overall_per_source_and_of_each_text_file(two_source_run, tmp_path):
    text_file = tmp_path / "poem.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    before = {name: os.stat(two_source_run / name).st_mtime_ns for name in os.listdir(two_source_run)}
    result = run_script("eval.py", f"--out_dir={two_source_run}", f"--text={text_file}", "--batch_size=4", "--device=cpu",
                        "--dtype=float32")
    assert result.returncode == 0, result.stderr
    assert {name: os.stat(two_source_run / name).st_mtime_ns for name in os.listdir(two_source_run)} == before
    table = {line.split()[0]: line.split()[-2:] for line in result.stdout.splitlines()[2:]}
    logged = read_events(two_source_run, "eval")[-1]  # train.py's last evaluation: the weights it saved
    assert table["val"] == [f"{logged['val_bpc']:.3f}", f"{logged['val_bpb']:.3f}"]
    for name in ("news", "novel"):
        assert table[name] == [f"{logged['val_sources'][name]['bpc']:.3f}", f"{logged['val_sources'][name]['bpb']:.3f}"]
    assert str(text_file) in table


def test_a_text_file_s_bits_by_hand(two_source_run):
    """The text as one document after <|endoftext|>, in consecutive windows of block_size targets:
    the log-probability of each token from the full logits, log-softmax written out."""
    eval_script = importlib.import_module("eval")
    checkpoint = ckpt.load(str(two_source_run / "ckpt.pt"))
    model, tokenizer = ckpt.model_from(checkpoint, 0.0).eval(), ckpt.tokenizer_of(checkpoint)
    tokens = [tokenizer.eot_token, *tokenizer.encode(TEXT)]
    block = model.config.block_size
    assert len(tokens) - 1 > 2 * block and (len(tokens) - 1) % block  # several windows, the last one short
    nats = 0.0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, block):
            window = torch.tensor(tokens[start:start + block + 1])
            logits = model.full_logits(window[None, :-1])[0].double()
            log_probs = logits - logits.exp().sum(dim=-1, keepdim=True).log()
            nats -= log_probs.gather(1, window[1:, None]).sum().item()
    bits = eval_script.text_bits(model, tokenizer, TEXT, 4, "cpu", torch.autocast("cpu", enabled=False))
    assert bits == pytest.approx(nats / math.log(2), rel=1e-6)


def test_eval_s_bad_input_is_one_line(two_source_run, tmp_path):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    cases = [
        ([f"--out_dir={tmp_path / 'nothing'}"], ["checkpoint", "not found"]),
        ([f"--out_dir={two_source_run}", f"--text={tmp_path / 'empty.txt'}"], ["empty.txt is empty"]),
        ([f"--out_dir={two_source_run}", f"--text={tmp_path / 'latin1.txt'}"], ["latin1.txt is not UTF-8 text"]),
        ([f"--out_dir={two_source_run}", f"--text={tmp_path / 'missing.txt'}"], ["missing.txt not found"]),
        ([f"--out_dir={two_source_run}", f"--text={tmp_path}"], ["is a folder"]),
        ([f"--out_dir={two_source_run}", f"--data_dir={tmp_path / 'no_data'}"], ["no_data not found"]),
        ([f"--out_dir={two_source_run}", "--text=/dev/zero"], ["/dev/zero is not a regular file"]),
    ]
    for args, words in cases:
        assert_user_error(run_script("eval.py", *args, "--device=cpu"), *words)


def test_a_checkpoint_with_fewer_rows_than_its_tokenizer_is_one_line(two_source_run, tmp_path):
    """Edited (its checksum made again: no signature), the model's rows cut below the tokenizer's ids."""
    state = torch.load(two_source_run / ckpt.FILENAME, weights_only=True)
    rows = 200
    state["model_args"] = state["model_args"] | {"vocab_size": rows}
    for key in ("transformer.wte.weight", "lm_head.weight"):
        state["model"][key] = state["model"][key][:rows].clone()
    (tmp_path / "run").mkdir()
    ckpt.save({k: v for k, v in state.items() if k != "checksum"}, str(tmp_path / "run" / ckpt.FILENAME))
    assert_user_error(run_script("eval.py", f"--out_dir={tmp_path / 'run'}", "--device=cpu"), "vocabulary has 200 rows")

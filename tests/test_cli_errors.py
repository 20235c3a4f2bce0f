"""Every row of the README's bad-input table: one line naming the problem, exit status 2, no
traceback, nothing half-written."""
import argparse

import numpy as np
import pytest
import torch

from conftest import TINY_MODEL_ARGS, assert_user_error, run_script


def train_on(data_dir, out_dir, *extra):
    return run_script("train.py", f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TINY_MODEL_ARGS,
                      "--max_iters=2", "--lr_decay_iters=2", "--warmup_iters=1", "--eval_iters=1", *extra)


def copy_data(tiny_data, folder):
    folder.mkdir()
    for name in ("train.bin", "val.bin", "meta.json"):
        (folder / name).write_bytes((tiny_data / name).read_bytes())
    return folder


@pytest.mark.parametrize("args, words", [
    (["--batchsize=4"], ["unknown option --batchsize", "batch_size"]),
    (["--max_iters=ten"], ["max_iters expects int"]),
    (["--batch_size=0"], ["--batch_size must be positive"]),
    (["--n_embd=30", "--n_head=4"], ["divisible"]),
    (["--optimizer=lion"], ["unknown --optimizer=lion"]),
    (["--device=cuda"] if not torch.cuda.is_available() else ["--device=tpu"], ["--device="]),
    (["--dtype=float8"], ["unknown --dtype=float8"]),
    (["--init_from=resume"], ["checkpoint", "not found"]),
])
def test_train_rejects_bad_options_without_writing(tiny_data, tmp_path, args, words):
    out = tmp_path / "out"
    assert_user_error(train_on(tiny_data, out, *args), *words)
    assert not out.exists()


def test_missing_data_dir(tmp_path):
    assert_user_error(train_on(tmp_path / "nowhere", tmp_path / "out"), "not found", "prepare.py")


def test_truncated_token_file(tiny_data, tmp_path):
    data = copy_data(tiny_data, tmp_path / "data")
    with open(data / "train.bin", "ab") as f:
        f.write(b"\x00")
    assert_user_error(train_on(data, tmp_path / "out"), "train.bin is truncated or corrupt")


def test_tokens_outside_the_vocabulary(tiny_data, tmp_path):
    data = copy_data(tiny_data, tmp_path / "data")
    tokens = np.fromfile(data / "val.bin", dtype=np.uint16)
    tokens[3] = 60000
    tokens.tofile(data / "val.bin")
    assert_user_error(train_on(data, tmp_path / "out"), "token 60000", "vocabulary")


def test_too_few_tokens_for_one_block(tiny_data, tmp_path):
    data = copy_data(tiny_data, tmp_path / "data")
    np.arange(10, dtype=np.uint16).tofile(data / "val.bin")
    assert_user_error(train_on(data, tmp_path / "out"), "val.bin has 10 tokens", "--block_size")


def test_corrupt_and_foreign_checkpoints(tiny_data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"not a checkpoint")
    assert_user_error(train_on(tiny_data, out, "--init_from=resume"), "unreadable or corrupt")
    assert_user_error(run_script("sample.py", f"--out_dir={out}"), "unreadable or corrupt")
    torch.save({"model": {}}, out / "ckpt.pt")
    assert_user_error(run_script("sample.py", f"--out_dir={out}"), "not an open-gpt-training/1 checkpoint")
    # a checkpoint holding an arbitrary Python object would need code to load: refused
    torch.save({"format": "open-gpt-training/1", "payload": argparse.Namespace(x=1)}, out / "ckpt.pt")
    assert_user_error(run_script("sample.py", f"--out_dir={out}"), "unreadable or corrupt")


def test_checkpoint_from_a_different_model_shape(tiny_data, tmp_path):
    out = tmp_path / "out"
    result = train_on(tiny_data, out, "--eval_interval=2")
    assert result.returncode == 0, result.stderr
    assert_user_error(train_on(tiny_data, out, "--init_from=resume", "--block_size=8"), "block_size 16")


def test_compile_where_it_does_not_work_is_one_line(monkeypatch):
    import cli
    import hardware

    def broken_compile(fn, **kwargs):
        def call(*args):
            raise RuntimeError("Compiler: cl is not found.\nlong explanation")
        return call
    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.raises(cli.UserError, match=r"torch.compile does not work on this machine \(RuntimeError: Compiler: cl is not found.\); use --compile=False"):
        hardware.check_compile_works("cpu")


def test_block_size_larger_than_the_pretrained_model_supports(tiny_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_dir = tmp_path / "hf"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=16)).save_pretrained(hf_dir)
    assert_user_error(train_on(tiny_data, tmp_path / "out", f"--init_from={hf_dir}", "--block_size=32"),
                      "--block_size=32 exceeds", "16")

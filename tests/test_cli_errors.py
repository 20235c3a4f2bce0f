"""Every row of the bad-input table (tests/BAD_INPUT.md): one line naming the problem, exit status
2, no traceback, nothing half-written."""
import argparse
import errno
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from opengpt import checkpoint as ckpt
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
    (["--beta1=1.0"], ["--beta1 must be in [0, 1)"]),
    (["--beta2=-0.5"], ["--beta2 must be in [0, 1)"]),
    (["--muon_momentum=1.0"], ["--muon_momentum must be in [0, 1)"]),
    (["--seed=-1"], ["--seed must be between 0 and"]),
    (["--seed=99999999999"], ["--seed must be between 0 and"]),
    (["--grad_clip=-1"], ["--grad_clip must be zero or positive"]),
    (["--weight_decay=-0.1"], ["--weight_decay must be zero or positive"]),
    (["--rho=-0.04"], ["--rho must be zero or positive"]),
    (["--activation=swish"], ["--activation must be one of gelu_new, relu2"]),
    (["--hessian_batch=old"], ["--hessian_batch must be fresh or step"]),
    (["--hessian_batch=step", "--gradient_accumulation_steps=2", "--hess_accumulation_steps=1"],
     ["--hessian_batch=step estimates the Hessian on all of the step's 2", "--hessian_batch=fresh"]),
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
    meta = json.loads((data / "meta.json").read_text(encoding="utf-8"))
    meta["splits"]["val"]["tokens"] = 10
    meta["splits"]["val"].pop("sources")  # its spans cover the real val.bin, not these 10 tokens
    (data / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    assert_user_error(train_on(data, tmp_path / "out"), "val.bin has 10 tokens", "--block_size")


def test_token_counts_must_match_meta_json(tiny_data, tmp_path):
    """A train.bin cut at a token boundary, or one from another prepare.py run: the count meta.json
    records gives it away."""
    data = copy_data(tiny_data, tmp_path / "data")
    tokens = np.fromfile(data / "train.bin", dtype=np.uint16)
    tokens[:-100].tofile(data / "train.bin")
    assert_user_error(train_on(data, tmp_path / "out"), f"train.bin holds {len(tokens) - 100} tokens",
                      f"records {len(tokens)}", "prepare.py")
    assert not (tmp_path / "out").exists()


def test_corrupt_and_foreign_checkpoints(tiny_data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"not a checkpoint")
    assert_user_error(train_on(tiny_data, out, "--init_from=resume"), "unreadable or corrupt")
    assert_user_error(run_script("sample.py", f"--out_dir={out}"), "unreadable or corrupt")
    (out / "ckpt.pt").write_bytes(b"")
    assert_user_error(train_on(tiny_data, out, "--init_from=resume"), "ckpt.pt is empty")
    torch.save({"model": {}}, out / "ckpt.pt")
    assert_user_error(run_script("sample.py", f"--out_dir={out}"), "not an open-gpt-training/2 checkpoint")
    # a checkpoint holding an arbitrary Python object would need code to load: refused
    torch.save({"format": "open-gpt-training/1", "payload": argparse.Namespace(x=1)}, out / "ckpt.pt")
    assert_user_error(run_script("sample.py", f"--out_dir={out}"), "unreadable or corrupt")


@pytest.fixture(scope="module")
def trained_out(tiny_data, tmp_path_factory):
    """The folder of a finished 2-step AdamW run (treat as read-only: copy it to change it)."""
    out = tmp_path_factory.mktemp("trained") / "out"
    result = train_on(tiny_data, out, "--eval_interval=2")
    assert result.returncode == 0, result.stderr
    return out


def test_resume_with_another_shape_or_optimizer_names_the_checkpoints_values(tiny_data, trained_out):
    """A resumed run keeps the checkpoint's shape and optimizer (its state holds the betas and the
    weight decay): flags that differ are refused, never silently ignored or logged as if used."""
    before = (trained_out / "metrics.jsonl").read_bytes()
    resume = (tiny_data, trained_out, "--init_from=resume")
    assert_user_error(train_on(*resume, "--block_size=8"), "block_size 16", "--block_size=16")
    assert_user_error(train_on(*resume, "--n_layer=2", "--n_embd=32"), "trained with n_layer 1, n_embd 16",
                      "--n_layer=1 --n_embd=16")
    assert_user_error(train_on(*resume, "--n_head=1"), "n_head 2", "--n_head=2")
    assert_user_error(train_on(*resume, "--optimizer=sophiag"), "optimizer adamw", "--optimizer=adamw")  # was a KeyError
    assert_user_error(train_on(*resume, "--weight_decay=0.5"), "weight_decay 0.1", "--weight_decay=0.1")
    assert_user_error(train_on(*resume, "--rotary=True", "--activation=relu2"), "rotary False, activation gelu_new",
                      "--rotary=False --activation=gelu_new")
    assert (trained_out / "metrics.jsonl").read_bytes() == before


def test_resume_of_a_muon_run_refuses_another_momentum(tiny_data, tmp_path):
    """Muon's state holds its momentum as well: a resumed run given another would silently keep the old."""
    out = tmp_path / "out"
    result = train_on(tiny_data, out, "--eval_interval=2", "--optimizer=muon", "--muon_momentum=0.9")
    assert result.returncode == 0, result.stderr
    assert_user_error(train_on(tiny_data, out, "--init_from=resume", "--optimizer=muon"), "muon_momentum 0.9",
                      "--muon_momentum=0.9")


def test_flipped_bytes_in_a_checkpoint_are_caught_by_its_checksum(tiny_data, trained_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained_out, out)
    path = out / "ckpt.pt"
    weight = torch.load(path, weights_only=True)["model"]["transformer.wte.weight"]
    data = bytearray(path.read_bytes())
    start = data.find(weight.numpy().tobytes()[:64])
    assert start > 0
    middle = start + weight.numel() * 4 // 2 // 4 * 4 + 3  # the sign and exponent byte of a float in the middle
    data[middle] ^= 0x40
    path.write_bytes(bytes(data))
    corrupt = torch.load(path, weights_only=True)["model"]["transformer.wte.weight"]
    assert not torch.equal(corrupt, weight)  # torch itself loads the damaged file without a word
    assert_user_error(train_on(tiny_data, out, "--init_from=resume", "--max_iters=4"), "ckpt.pt is corrupt", "checksum")
    assert_user_error(run_script("sample.py", f"--out_dir={out}"), "ckpt.pt is corrupt", "checksum")


def test_a_checkpoint_of_format_1_is_refused_in_one_line_that_says_how_to_carry_it_over(tiny_data, trained_out, tmp_path):
    """open-gpt-training/1 (no checksum), this project's own before 2026-11-28: one format is read, the rest
    refused; its export, made by the version that wrote it, loads here."""
    out = tmp_path / "out"
    out.mkdir()
    checkpoint = torch.load(trained_out / "ckpt.pt", weights_only=True)
    del checkpoint["checksum"]
    torch.save(checkpoint | {"format": "open-gpt-training/1"}, out / "ckpt.pt")
    for result in (run_script("sample.py", f"--out_dir={out}"), train_on(tiny_data, out, "--init_from=resume")):
        assert_user_error(result, "is an open-gpt-training/1 checkpoint, from this project before 2026-11-28",
                          "export it with the version that wrote it", "--init_from=EXPORT_FOLDER")


@pytest.mark.parametrize("name, words", [
    (None, ["--out_dir is empty"]),
    ("a_file", ["a_file is an existing file, not a folder"]),
    ("a_file/run", ["cannot create --out_dir=", "Not a directory"]),
])
def test_out_dir_that_cannot_be_a_folder(tiny_data, tmp_path, name, words):
    (tmp_path / "a_file").write_text("x")
    assert_user_error(train_on(tiny_data, tmp_path / name if name else ""), *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_out_dir_on_a_read_only_filesystem(tiny_data, read_only_folder):
    assert_user_error(train_on(tiny_data, read_only_folder / "run"), "cannot create --out_dir=")
    assert_user_error(train_on(tiny_data, read_only_folder), "cannot write in --out_dir=")


def test_full_disk_while_saving_keeps_the_earlier_checkpoint(tiny_data, mount_tmpfs):
    """A real full filesystem (a tmpfs with room for one checkpoint of the tiny model, ~9.7 MB, but
    not for the temp file of the next): the run stops with one line, and the checkpoint it would
    have replaced is whole."""
    out = mount_tmpfs("16m") / "run"
    result = train_on(tiny_data, out, "--max_iters=4", "--lr_decay_iters=4", "--eval_interval=2")
    assert_user_error(result, f"could not write checkpoint {out}/ckpt.pt", "MB free there", "ckpt.pt there is intact")
    assert ckpt.load(str(out / "ckpt.pt"))["iter_num"] == 2  # and its checksum holds
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "metrics.jsonl"]  # no temp file, no lock left


def test_compile_where_it_does_not_work_is_one_line(monkeypatch):
    from opengpt import cli
    from opengpt import hardware

    def broken_compile(fn, **kwargs):
        def call(*args):
            raise RuntimeError("Compiler: cl is not found.\nlong explanation")
        return call
    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.raises(cli.UserError, match=r"torch.compile does not work on this machine \(RuntimeError: Compiler: cl is not found.\); use --compile=False"):
        hardware.check_compile_works("cpu")


def test_compile_errors_that_are_an_unwritable_cache_folder():
    from opengpt import hardware

    def chained(outer, inner):
        try:
            raise inner
        except Exception:
            try:
                raise outer  # implicitly chained, as inductor's InductorError is to the OSError
            except Exception as e:
                return e
    read_only = chained(RuntimeError("InductorError"), OSError(errno.EROFS, "Read-only file system"))
    assert hardware.unwritable_folder_error(read_only).errno == errno.EROFS
    linker = RuntimeError("C++ compile error")
    linker.output = "/usr/bin/ld: final link failed: No space left on device"
    assert hardware.unwritable_folder_error(RuntimeError("plain")) is None
    outer = RuntimeError("outer")
    outer.__cause__ = linker
    assert hardware.unwritable_folder_error(outer).errno == errno.ENOSPC
    # a missing compiler is not a folder's fault, nor is "Permission denied" in a compiler's output
    assert hardware.unwritable_folder_error(chained(RuntimeError("x"), FileNotFoundError(errno.ENOENT, "g++"))) is None
    linker.output = "g++: error: cannot execute 'cc1plus': Permission denied"
    assert hardware.unwritable_folder_error(outer) is None
    loop = RuntimeError("a")
    loop.__context__ = RuntimeError("b")
    loop.__context__.__context__ = loop
    assert hardware.unwritable_folder_error(loop) is None


def test_compile_with_a_full_compile_cache_folder_is_one_line(monkeypatch, tmp_path):
    from opengpt import cli
    from opengpt import hardware

    def full_cache(fn, **kwargs):
        def call(*args):
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError("InductorError: OSError") from None  # the OSError stays as __context__
        return call
    monkeypatch.setattr(torch, "compile", full_cache)
    monkeypatch.setattr("torch._inductor.runtime.cache_dir_utils.cache_dir", lambda: str(tmp_path))
    with pytest.raises(cli.UserError, match=f"torch.compile could not write its compiled code in {tmp_path} \\(No space left "
                                            "on device, .* MB free there\\); free space there, set TORCHINDUCTOR_CACHE_DIR"):
        hardware.check_compile_works("cpu")


def test_config_file_that_is_not_utf8(tiny_data, tmp_path):
    config_file = tmp_path / "gbk_config.py"
    config_file.write_bytes("batch_size = 4  # 批量大小\n".encode("gbk"))
    assert_user_error(train_on(tiny_data, tmp_path / "out", str(config_file)), "gbk_config.py is not UTF-8")


def test_truncated_or_foreign_transformers_folders(tiny_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    good = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=16)).save_pretrained(good)
    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    # BERT with GPT-2's vocabulary size: transformers would fill a GPT-2 with random weights from it
    bert = tmp_path / "bert"
    transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=50257, num_hidden_layers=1, hidden_size=16,
                                                         num_attention_heads=2, intermediate_size=32)).save_pretrained(bert)
    assert_user_error(train_on(tiny_data, tmp_path / "out", f"--init_from={truncated}"), "could not load GPT-2 weights")
    assert_user_error(train_on(tiny_data, tmp_path / "out", f"--init_from={bert}"), "is not a GPT-2 model")
    assert_user_error(run_script("sample.py", f"--init_from={bert}"), "is not a GPT-2 model")
    assert not (tmp_path / "out").exists()


def test_block_size_larger_than_the_pretrained_model_supports(tiny_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_dir = tmp_path / "hf"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=16)).save_pretrained(hf_dir)
    assert_user_error(train_on(tiny_data, tmp_path / "out", f"--init_from={hf_dir}", "--block_size=32"),
                      "--block_size=32 exceeds", "16")


def test_a_rank_whose_peer_died_ends_in_one_line_and_other_errors_stay_loud(monkeypatch, capsys):
    """A rank killed under torchrun (kill -9, an OOM kill) left ~20 lines of gloo traceback on the others."""
    from opengpt import cli

    def collective():
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:30616: "
                           "Connection reset by peer. This is typically caused by a remote peer exiting")

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as stopped:
        cli.run(collective)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{os.path.basename(sys.argv[0])}: error: another process of this run stopped (Connection reset by peer); its latest "
        "checkpoint is as saved: continue with the same command plus --init_from=resume"]
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: no peer to lose, so a bug
    with pytest.raises(RuntimeError, match="Connection reset by peer"):
        cli.run(collective)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="something else"):
        cli.run(lambda: (_ for _ in ()).throw(RuntimeError("something else")))

import os
import sys

import pytest
import torch

from opengpt import decode, hardware
import sample
from opengpt.cli import UserError
from conftest import TINY_MODEL_ARGS, assert_user_error, run_script
from opengpt.tokenizer import GPT2Tokenizer


@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sample_run")
    result = run_script("train.py", f"--data_dir={tiny_data}", f"--out_dir={out}", *TINY_MODEL_ARGS, "--max_iters=30",
                        "--lr_decay_iters=30", "--warmup_iters=2", "--eval_interval=30", "--eval_iters=1",
                        "--learning_rate=1e-2", "--log_interval=10")
    assert result.returncode == 0, result.stderr
    return out


def test_sample_prints_valid_utf8_chinese(trained_run, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("滚滚长江", encoding="utf-8")
    result = run_script("sample.py", f"--out_dir={trained_run}", f"--start=FILE:{prompt}", "--num_samples=2",
                        "--max_new_tokens=40", "--device=cpu")
    assert result.returncode == 0, result.stderr
    samples = result.stdout.split("---------------\n")
    assert len(samples) == 3 and samples[-1] == ""
    assert all(s.startswith("滚滚长江") for s in samples[:2])
    assert "\ufffd" not in result.stdout
    result.stdout.encode("utf-8")  # printable as UTF-8
    # each sample's speed, on stderr (stdout is the text alone), in float32: the CPU default for sampling
    speeds = [line for line in result.stderr.splitlines() if "tokens/s" in line]
    assert len(speeds) == 2 and all("40 new tokens in" in s and "KV cache on, float32" in s for s in speeds), result.stderr


def test_sampling_defaults_to_float32_on_a_cpu_only():
    assert sample.sampling_dtype("auto", "cpu") == "float32"
    assert sample.sampling_dtype("bfloat16", "cpu") == "bfloat16"  # asked for: kept


def test_same_seed_gives_the_same_samples_with_and_without_kv_cache(trained_run):
    runs = [run_script("sample.py", f"--out_dir={trained_run}", "--start=浪花", "--num_samples=1",
                       "--max_new_tokens=20", "--device=cpu", "--seed=5", f"--use_kv_cache={cache}") for cache in (True, False)]
    assert runs[0].returncode == 0 and runs[0].stdout == runs[1].stdout


def test_compiled_sampling_runs_compiled_code_for_every_token_and_samples_the_same(trained_run, monkeypatch, capsys):
    try:
        hardware.check_compile_works("cpu")
    except UserError as e:
        pytest.skip(str(e))
    real_compile, real_ahead_of_time_step, compiled_calls = torch.compile, decode.ahead_of_time_step, []

    def counting(compile_function, name_of):
        def counting_compile(fn, *args, **kwargs):
            compiled = compile_function(fn, *args, **kwargs)

            def call(*call_args, **call_kwargs):
                compiled_calls.append(name_of(fn))
                return compiled(*call_args, **call_kwargs)
            return call
        return counting_compile

    monkeypatch.setattr(torch, "compile", counting(real_compile, lambda fn: getattr(fn, "__name__", "")))
    monkeypatch.setattr(decode, "ahead_of_time_step", counting(real_ahead_of_time_step, lambda step: "ahead_of_time_step"))
    monkeypatch.setattr(decode, "_compiled_steps", {})  # compiled afresh, through the counters, and not kept after
    texts = []
    for compile_model in (False, True):
        monkeypatch.setattr(sys, "argv", ["sample.py", f"--out_dir={trained_run}", "--start=浪花", "--num_samples=1",
                                          "--max_new_tokens=6", "--device=cpu", "--seed=5", f"--compile={compile_model}",
                                          "--dtype=float32"])  # bfloat16 would round compiled and eager differently
        sample.main()
        texts.append(capsys.readouterr().out)
    # hardware.check_compile_works compiles a lambda of its own; everything else is the model: the prompt's forward
    # (torch.compile), then decode.py's one-token step, compiled ahead of time on a CPU, for each of the 5 tokens after
    # the first (the sequence fits the block)
    assert [name for name in compiled_calls if name != "<lambda>"] == ["hidden_states"] + ["ahead_of_time_step"] * 5
    assert texts[0] == texts[1] and texts[0].startswith("浪花")


def test_characters_split_across_tokens_decode_cleanly():
    encoding = GPT2Tokenizer()
    text = "滚滚长江东逝水"
    ids = encoding.encode(text)
    assert any("\ufffd" in encoding.decode([t]) for t in ids)  # single tokens hold partial characters
    assert sample.decode_clean(encoding, ids) == text
    # a character cut off at the very end is dropped, not shown as U+FFFD
    cut = encoding.encode("长")[:-1]
    assert sample.decode_clean(encoding, encoding.encode("江") + cut) == "江"


def test_compiled_sampling_with_a_read_only_compile_cache_is_one_line(trained_run, read_only_folder):
    result = run_script("sample.py", f"--out_dir={trained_run}", "--compile=True", "--max_new_tokens=5",
                        env=dict(TORCHINDUCTOR_CACHE_DIR=str(read_only_folder)))
    assert_user_error(result, f"torch.compile could not write its compiled code in {read_only_folder} (",
                      "set TORCHINDUCTOR_CACHE_DIR to a folder you can write, or use --compile=False")
    assert "free space" not in result.stderr  # the folder is not full: that fix would not help
    assert list(read_only_folder.iterdir()) == []


def test_start_file_that_is_missing_or_a_folder(trained_run, tmp_path):
    assert_user_error(run_script("sample.py", f"--out_dir={trained_run}", f"--start=FILE:{tmp_path / 'none.txt'}"),
                      "prompt file", "not found")
    assert_user_error(run_script("sample.py", f"--out_dir={trained_run}", f"--start=FILE:{tmp_path}"), "is a folder")


@pytest.mark.parametrize("args, words", [
    (["--temperature=1e999"], ["the temperature finite"]),  # parses as inf: every token equally likely
    (["--seed=99999999999999999999"], ["--seed must be between 0 and 2147483647"]),
    (["--seed=-1"], ["--seed must be between 0 and 2147483647"]),
    (["--max_new_tokens=100000000000000"], ["100,000,000,000,000 new tokens", "use a smaller --max_new_tokens"]),
    (["--init_from=scratch"], ["--init_from=scratch has no weights to sample from here"]),
])
def test_sampling_options_out_of_range_are_one_line(trained_run, args, words):
    assert_user_error(run_script("sample.py", f"--out_dir={trained_run}", "--num_samples=1", *args), *words)


def test_a_run_folder_as_init_from_or_a_pipe_as_prompt_is_one_line(trained_run, tmp_path):
    assert_user_error(run_script("sample.py", f"--init_from={trained_run}"), f"sampled with --out_dir={trained_run}")
    fifo = tmp_path / "prompt"
    os.mkfifo(fifo)  # reading it would wait for a writer for ever
    assert_user_error(run_script("sample.py", f"--out_dir={trained_run}", f"--start=FILE:{fifo}"), "is not a regular file")


def test_a_checkpoint_that_is_a_pipe_or_an_old_pickle_is_one_line_and_runs_nothing(tmp_path):
    import pickle

    (tmp_path / "pipe").mkdir()
    os.mkfifo(tmp_path / "pipe" / "ckpt.pt")
    assert_user_error(run_script("sample.py", f"--out_dir={tmp_path / 'pipe'}"), "is not a regular file (a pipe or a device)")
    (tmp_path / "old").mkdir()
    marker = tmp_path / "ran"
    with open(tmp_path / "old" / "ckpt.pt", "wb") as f:  # protocol 2, no zip: torch's legacy format
        pickle.dump({"x": Runs(str(marker))}, f, protocol=2)
    result = run_script("sample.py", f"--out_dir={tmp_path / 'old'}")
    assert_user_error(result, "holds Python objects that need code to load (io.open)", "nothing of it was run")
    assert not marker.exists() and "Warning" not in result.stderr


class Runs:
    """Unpickling it would create a file: the proof that a checkpoint ran code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))

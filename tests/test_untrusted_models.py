"""The promise: no code runs from a checkpoint or a model folder, and nothing in one is trusted for
its sizes. A checkpoint's checksum is no signature and a transformers folder is anyone's files, so
sample.py, train.py and export.py check what they declare against what they hold before building
anything, and refuse in one line. Each case runs the real script, under a memory limit far below
what a crafted size would allocate."""
import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, TINY_MODEL_ARGS, assert_user_error, run_script, tiny_documents
from model import GPT, GPTConfig
from opengpt import checkpoint as ckpt
from opengpt.tokenizer import GPT2Tokenizer, TokenizerError, read_tokenizer_file, train_bpe

transformers = pytest.importorskip("transformers")

MEMORY_LIMIT = 6 << 30  # bytes of address space: a crafted size asks for terabytes, a tiny model for far less
TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50304, dropout=0.0, bias=True,
            scale_attn_by_inverse_layer_idx=False, rotary=False, activation="gelu_new")


def limited(script, *args, cwd=REPO, env=None):
    """run_script under MEMORY_LIMIT, so that a script that believes a crafted size fails fast
    (a traceback, which the tests catch) instead of taking the machine's memory."""
    return run_script(script, *args, cwd=cwd, env=dict(RUST_BACKTRACE="0", **(env or {})), memory_limit=MEMORY_LIMIT)


def tiny_state(tokenizer=None):
    """A checkpoint's contents, as train.py saves them, for a tiny model."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return ckpt.training_state(model, torch.optim.AdamW(model.parameters()), scaler, dict(TINY), 2, 9.9, {},
                               torch.Generator().manual_seed(0), tokenizer or GPT2Tokenizer(), torch.Generator())


def save_crafted(out_dir, state):
    """state saved with a checksum that matches it, as anyone can compute one."""
    os.makedirs(out_dir, exist_ok=True)
    ckpt.save({k: v for k, v in state.items() if k != "checksum"}, os.path.join(out_dir, ckpt.FILENAME))
    return out_dir


def gpt2_folder(path, **config):
    """A tiny transformers GPT-2 folder (GPT-2's vocabulary, so that sample.py's GPT-2 tokenizer fits)."""
    config = dict(n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=50257) | config
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).save_pretrained(path)
    return path


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")


# ---- no code runs from a model folder or a checkpoint ----

EVIL_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("the folder's code ran")
from transformers import PretrainedConfig
class EvilConfig(PretrainedConfig):
    model_type = "evil"
"""


def run_on_a_terminal(args, answer, env, timeout=300):
    """(exit status, everything the script showed) of a script whose stdin, stdout and stderr are a
    terminal (a pty), answering `answer` to any [y/N] question, as a person might."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, stdin=terminal, stdout=terminal,
                            stderr=terminal, env=env, start_new_session=True)
    os.close(terminal)
    shown, answered, deadline = b"", False, time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 0.5)
        if ready:
            try:
                data = os.read(controller, 4096)
            except OSError:  # the script ended and closed the terminal
                break
            if not data:
                break
            shown += data
            if b"[y/N]" in shown and not answered:
                os.write(controller, answer)
                answered = True
        elif proc.poll() is not None:
            break
    os.close(controller)
    status = proc.wait(timeout=60)
    return status, shown.decode("utf-8", "replace")


def test_no_code_runs_from_a_model_folder_even_when_the_terminal_says_yes(tiny_data, tmp_path):
    """config.json with auto_map and no model_type: transformers would ask on a terminal whether to
    run the folder's evil.py, and run it on "y". Refused before transformers sees the folder."""
    marker = tmp_path / "the_code_ran"
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"auto_map": {"AutoConfig": "evil.EvilConfig",
                                                                 "AutoModelForCausalLM": "evil.EvilModel"}}))
    (folder / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf_home"),
               HF_MODULES_CACHE=str(tmp_path / "hf_modules"), TERM="dumb")
    for args in (["sample.py", f"--init_from={folder}", "--max_new_tokens=2", "--device=cpu"],
                 ["train.py", f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'out'}", f"--init_from={folder}",
                  *TINY_MODEL_ARGS, "--max_iters=1"]):
        status, shown = run_on_a_terminal(args, b"y\n", env)
        assert not marker.exists(), shown
        assert "[y/N]" not in shown, shown
        lines = shown.strip().splitlines()
        assert status == 2 and len(lines) == 1 and "auto_map" in lines[0] and "never runs code" in lines[0], shown
    assert not (tmp_path / "out").exists() and not (tmp_path / "hf_modules").exists()


class RunsCode:
    """Pickled, it asks the loader to call os.system: what a malicious checkpoint would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_no_code_runs_from_a_checkpoint(tmp_path):
    marker = tmp_path / "the_code_ran"
    out = tmp_path / "out"
    out.mkdir()
    state = tiny_state()
    state["config"] = {"payload": RunsCode(marker)}
    torch.save(state, out / ckpt.FILENAME)  # torch.save pickles it; a loader without weights_only would run it
    assert_user_error(limited("sample.py", f"--out_dir={out}", "--device=cpu"), "unreadable or corrupt")
    assert_user_error(limited("export.py", f"--out_dir={out}", f"--export_dir={tmp_path / 'hf'}"), "unreadable or corrupt")
    assert not marker.exists() and sorted(os.listdir(tmp_path)) == ["out"]


def test_every_from_pretrained_call_refuses_remote_code(tmp_path, monkeypatch):
    """Besides the refusal above, the calls themselves pass trust_remote_code=False: for a hub name
    there is no folder to check first."""
    import export

    calls, depth = [], [0]

    def spy(name):
        cls = getattr(transformers, name)
        original = cls.from_pretrained

        def recorded(*args, **kwargs):
            if depth[0] == 0:  # our calls, not those transformers makes inside them
                calls.append((name, kwargs.get("trust_remote_code", "not passed")))
            depth[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                depth[0] -= 1
        monkeypatch.setattr(cls, "from_pretrained", recorded)

    names = {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM", "GPT2LMHeadModel", "GPTNeoXForCausalLM", "GPT2TokenizerFast"}
    for name in names:
        spy(name)
    for rotary in (False, True):
        run = tmp_path / f"run{rotary}"
        state = tiny_state()
        if rotary:  # a rotary model, exported as GPT-NeoX
            torch.manual_seed(0)
            model = GPT(GPTConfig(**TINY | {"rotary": True}))
            state["model_args"] = TINY | {"rotary": True}
            state["model"] = model.state_dict()
        save_crafted(run, state)
        monkeypatch.setattr(sys, "argv", ["export.py", f"--out_dir={run}", f"--export_dir={tmp_path / f'hf{rotary}'}"])
        monkeypatch.setattr(signal, "signal", lambda *args: None)  # export.main's SIGTERM handler is the script's
        export.main()
        GPT.from_pretrained(str(tmp_path / f"hf{rotary}"))
    assert {name for name, _ in calls} == names
    assert all(trust is False for _, trust in calls), calls


# ---- a crafted checkpoint: structure and sizes checked before anything is built ----

def crafted(change):
    state = tiny_state()
    change(state)
    return state


CRAFTED_CHECKPOINTS = {
    # 13 TB of weights declared, 3 MB held
    "n_embd=2**20": (lambda s: s["model_args"].update(n_embd=2 ** 20), ["n_embd=1048576", "transformer.wte.weight is (50304, 16)"]),
    "a million layers": (lambda s: s["model_args"].update(n_layer=10 ** 6), ["n_layer=1000000", "holds 1 layers"]),
    "swish": (lambda s: s["model_args"].update(activation="swish"), ["activation must be one of gelu_new, relu2, got 'swish'"]),
    "an extra key": (lambda s: s["model_args"].update(colour="blue"), ["unknown key 'colour'"]),
    "model_args a list": (lambda s: s.update(model_args=list(s["model_args"].items())), ["model_args is a list, not a dict"]),
    "a string for a size": (lambda s: s["model_args"].update(block_size="16"), ["block_size='16' should be an int, not a str"]),
    "True for a size": (lambda s: s["model_args"].update(n_layer=True), ["n_layer=True should be an int, not a bool"]),
    "a missing weight": (lambda s: s["model"].pop("transformer.ln_f.weight"), ["missing ['transformer.ln_f.weight']"]),
    "model a list": (lambda s: s.update(model=[1, 2]), ["model is not a dict of named tensors"]),
    "tokenizer a string": (lambda s: s.update(tokenizer="gpt2"), ["tokenizer", "str"]),
    "iter_num a string": (lambda s: s.update(iter_num="2"), ["iter_num is a str, not an int"]),
    "config a string": (lambda s: s.update(config="out"), ["config is a str, not a dict"]),
}


@pytest.mark.parametrize("case", CRAFTED_CHECKPOINTS)
def test_a_crafted_checkpoint_is_one_line_before_anything_is_built(tiny_data, tmp_path, case):
    change, words = CRAFTED_CHECKPOINTS[case]
    out = save_crafted(tmp_path / "out", crafted(change))
    before = (out / ckpt.FILENAME).read_bytes()
    assert_user_error(limited("sample.py", f"--out_dir={out}", "--device=cpu", "--max_new_tokens=2"), *words)
    if case in ("n_embd=2**20", "model_args a list"):  # export.py and a resumed run load through the same checks
        assert_user_error(limited("export.py", f"--out_dir={out}", f"--export_dir={tmp_path / 'hf'}"), *words)
        assert_user_error(limited("train.py", f"--data_dir={tiny_data}", f"--out_dir={out}", "--init_from=resume",
                                  *TINY_MODEL_ARGS, "--max_iters=4"), *words)
    assert (out / ckpt.FILENAME).read_bytes() == before and sorted(os.listdir(tmp_path)) == ["out"]


def test_non_finite_weights_are_one_line_in_sample_and_export(tmp_path):
    """A run that diverged: NaN weights export to a folder whose check fails (an AssertionError), or
    sample noise."""
    state = tiny_state()
    state["model"]["transformer.h.0.mlp.c_fc.weight"][0, :3] = float("nan")
    out = save_crafted(tmp_path / "out", state)
    assert_user_error(limited("export.py", f"--out_dir={out}", f"--export_dir={tmp_path / 'hf'}"),
                      "not finite", "3 of 1,024 values of transformer.h.0.mlp.c_fc.weight")
    assert_user_error(limited("sample.py", f"--out_dir={out}", "--device=cpu"), "not finite")
    assert sorted(os.listdir(tmp_path)) == ["out"]


# ---- a transformers folder: its declared sizes against its weight file ----

def test_a_folder_declaring_sizes_its_weights_do_not_hold_is_one_line(tiny_data, tmp_path):
    """n_embd=10**7 with a 3 MB weight file would allocate 20 GB before transformers saw the mismatch."""
    wide = gpt2_folder(tmp_path / "wide")
    edit_config(wide, n_embd=10 ** 7)
    deep = gpt2_folder(tmp_path / "deep")
    edit_config(deep, n_layer=10 ** 4)
    long = gpt2_folder(tmp_path / "long")
    edit_config(long, n_inner=10 ** 9)
    for folder, words in ((wide, ["transformer.wte.weight would be (50257, 10000000)", "(50257, 16)"]),
                          (deep, ["declares 10000 layers but its weights hold 1"]),
                          (long, ["mlp.c_fc.weight would be (16, 1000000000)"])):
        assert_user_error(limited("sample.py", f"--init_from={folder}", "--device=cpu"), *words)
        assert_user_error(limited("train.py", f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'out'}",
                                  f"--init_from={folder}", *TINY_MODEL_ARGS, "--max_iters=1"), *words)
    assert not (tmp_path / "out").exists()


def test_a_gpt_neox_folder_declaring_a_huge_mlp_or_context_is_one_line(tmp_path):
    neox = tmp_path / "neox"
    transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=50257, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, use_parallel_residual=False, tie_word_embeddings=True)).save_pretrained(neox)
    edit_config(neox, intermediate_size=10 ** 9)
    assert_user_error(limited("sample.py", f"--init_from={neox}", "--device=cpu"), "dense_h_to_4h.weight would be")
    edit_config(neox, intermediate_size=64, max_position_embeddings=10 ** 12)  # held by no tensor: bounded
    assert_user_error(limited("sample.py", f"--init_from={neox}", "--device=cpu"), "max_position_embeddings=1000000000000")


def test_weights_that_are_not_a_weights_file_or_a_file_for_a_folder_are_one_line(tiny_data, tmp_path):
    good = gpt2_folder(tmp_path / "good")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    shutil.copy(good / "config.json", garbage / "config.json")
    (garbage / "pytorch_model.bin").write_bytes(b"this is not a weights file\n" * 10)
    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    (truncated / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:100])
    cases = [(garbage, ["pytorch_model.bin is not a weights file"]), (truncated, ["could not load GPT-2 weights"]),
             (good / "config.json", ["is a file", f"--init_from={good}"]),
             (good / "model.safetensors", ["is a file", f"--init_from={good}"]),
             (tmp_path / "empty_folder", ["has no config.json"])]
    (tmp_path / "empty_folder").mkdir()
    for init_from, words in cases:
        assert_user_error(limited("sample.py", f"--init_from={init_from}", "--device=cpu"), *words)
        assert_user_error(limited("train.py", f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'out'}",
                                  f"--init_from={init_from}", *TINY_MODEL_ARGS, "--max_iters=1"), *words)
    assert not (tmp_path / "out").exists()


def test_a_folder_whose_vocabulary_is_smaller_than_its_tokenizer_is_one_line(tmp_path):
    """64 rows and no tokenizer.json: GPT-2's 50257 tokens would index past the embedding."""
    folder = gpt2_folder(tmp_path / "small_vocab", vocab_size=64)
    assert_user_error(limited("sample.py", f"--init_from={folder}", "--device=cpu", "--start=hello"),
                      "has no tokenizer.json, and its vocabulary is not GPT-2's")


# ---- tokenizer files: a regular file of a bounded size, and regexes that end ----

def catastrophic_tokenizer_json():
    """A byte-level BPE whose pre-tokenizer first splits on (a+)+$: exponential on "aaa...a!"."""
    spec = json.loads(train_bpe(tiny_documents(300), 300).json_text)
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False}, spec["pre_tokenizer"]]}
    return json.dumps(spec)


def test_a_tokenizer_with_a_catastrophic_regex_is_one_line(tmp_path):
    folder = gpt2_folder(tmp_path / "model", vocab_size=320)
    (folder / "tokenizer.json").write_text(catastrophic_tokenizer_json(), encoding="utf-8")
    assert_user_error(limited("sample.py", f"--init_from={folder}", "--device=cpu", "--start=" + "a" * 40 + "!"),
                      "tokenizer.json fails on ordinary text", "use another tokenizer")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(tiny_documents(50)), encoding="utf-8")
    assert_user_error(limited("prepare.py", f"--input={corpus}", f"--out={tmp_path / 'data'}",
                              f"--tokenizer={folder / 'tokenizer.json'}"), "fails on ordinary text")
    # the same tokenizer carried in a checkpoint
    state = tiny_state()
    state["tokenizer"] = {"kind": "bpe", "json": catastrophic_tokenizer_json()}
    state["model_args"]["vocab_size"] = 320
    torch.manual_seed(0)
    state["model"] = GPT(GPTConfig(**state["model_args"])).state_dict()
    out = save_crafted(tmp_path / "out", state)
    assert_user_error(limited("sample.py", f"--out_dir={out}", "--device=cpu", "--start=" + "a" * 40 + "!"),
                      "the checkpoint's tokenizer cannot be loaded: it fails on ordinary text")
    assert not (tmp_path / "data").exists()


def test_sound_regexes_pass_the_probe():
    """GPT-2's own pattern as a Split pre-tokenizer, as foreign tokenizer.json files carry it."""
    from opengpt.tokenizer import GPT2_PATTERN, BPETokenizer, probe_regexes, regex_panics_refused

    spec = json.loads(train_bpe(tiny_documents(300), 300).json_text)
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": GPT2_PATTERN}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    with regex_panics_refused("test"):
        probe_regexes(BPETokenizer(json.dumps(spec)))


def test_a_tokenizer_file_that_is_a_device_a_pipe_or_huge_is_one_line(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(tiny_documents(50)), encoding="utf-8")
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)  # opening it would wait for a writer for ever
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:
        f.truncate(300 * 1024 * 1024)  # sparse: takes no disk
    for path, words in (("/dev/zero", ["/dev/zero is not a regular file"]), (fifo, ["pipe.json is not a regular file"]),
                        (huge, ["315 MB, more than any tokenizer.json"])):
        assert_user_error(limited("prepare.py", f"--input={corpus}", f"--out={tmp_path / 'data'}", f"--tokenizer={path}"), *words)
        with pytest.raises(TokenizerError):
            read_tokenizer_file(str(path))
    assert not (tmp_path / "data").exists()
    # in a model folder, a tokenizer.json that is a link to a device is refused, not replaced by GPT-2's
    folder = gpt2_folder(tmp_path / "model")
    (folder / "tokenizer.json").symlink_to("/dev/zero")
    assert_user_error(limited("sample.py", f"--init_from={folder}", "--device=cpu"), "is not a regular file")

"""A checkpoint save killed mid-write leaves its temp file (.ckpt.pt.tmp<pid>, a checkpoint's size);
the next save removes those of processes that are gone, and nothing else."""
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import REPO
from model import GPT, GPTConfig
from opengpt import checkpoint as ckpt
from opengpt.tokenizer import GPT2Tokenizer

# A save that writes part of the checkpoint, then waits to be killed.
KILLED_SAVE = """
import os, sys, time, torch
from opengpt import checkpoint as ckpt

def half_written(state, path):
    with open(path, "wb") as f:
        f.write(b"half a checkpoint" * 1000)
    open(sys.argv[2], "w").close()
    time.sleep(3600)

torch.save = half_written
ckpt.save({"format": ckpt.FORMAT}, sys.argv[1])
"""


def tiny_state():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=64))
    model_args = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=64)
    return ckpt.training_state(model, torch.optim.AdamW(model.parameters()), torch.amp.GradScaler("cpu", enabled=False),
                               model_args, 0, 9.9, {}, torch.Generator(), GPT2Tokenizer(), torch.Generator())


def test_the_next_save_removes_what_killed_saves_left_and_nothing_else(tmp_path):
    path = tmp_path / ckpt.FILENAME
    flag = tmp_path / "writing"
    killed = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(path), str(flag)], cwd=REPO,
                              env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"))
    for _ in range(2400):
        if flag.exists() or killed.poll() is not None:
            break
        time.sleep(0.05)
    assert flag.exists()
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)  # reaped: its pid is gone
    dead_temp = tmp_path / f".{ckpt.FILENAME}.tmp{killed.pid}"
    assert dead_temp.stat().st_size > 0
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        live_temp = tmp_path / f".{ckpt.FILENAME}.tmp{live.pid}"  # a save still running elsewhere
        live_temp.write_bytes(b"being written")
        user_file = tmp_path / f".{ckpt.FILENAME}.tmp-notes"  # not a pid: not ours
        user_file.write_text("mine")
        ckpt.save(tiny_state(), str(path))
        assert not dead_temp.exists()
        assert live_temp.read_bytes() == b"being written" and user_file.read_text() == "mine"
        assert ckpt.load(str(path))["iter_num"] == 0
    finally:
        live.kill()
        live.wait()

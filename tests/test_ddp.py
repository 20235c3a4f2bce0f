"""Distributed training (torchrun, gloo on CPU) is the same training as one process.

gradient_accumulation_steps is per process and every rank draws the windows of all ranks from one
identically seeded generator (data.py), so 2 processes x accumulation 1 must reproduce 1 process x
accumulation 2: the same loss at every iteration, the same weights and the same optimizer state
(for SophiaG that includes the Hessian EMA, whose micro-batches and sampled labels must also be
split across ranks like the 1-process run's). Each case runs train.py under torchrun on the tiny
corpus of conftest.py, with a timeout, and kills the whole launch on failure so that a hung
collective cannot block the suite.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, TINY_MODEL_ARGS
from opengpt import checkpoint as ckpt

TIMEOUT_S = 240  # a tiny run takes ~10-30 s; this is only the guard against a deadlock

# the accumulation given per run (train_args) overrides TINY_MODEL_ARGS's, the later flag winning
TINY = [*TINY_MODEL_ARGS, "--max_iters=6", "--eval_interval=6", "--eval_iters=1", "--warmup_iters=1",
        "--lr_decay_iters=6", "--log_interval=1"]
OPTIMIZERS = {"adamw": ["--optimizer=adamw"], "sophiag": ["--optimizer=sophiag", "--hess_interval=2"],
              "sophiag_step": ["--optimizer=sophiag", "--hess_interval=2", "--hessian_batch=step"]}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def subprocess_env():
    # one thread per process: the ranks share two cores with the rest of the suite
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_all(commands, cwd):
    """Start the commands together and wait for all; their outputs. On a timeout or a failure, kill
    every one of them (the whole process group: torchrun's workers too) and fail with the output."""
    procs = [subprocess.Popen(command, cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True) for command in commands]
    deadline = time.monotonic() + TIMEOUT_S
    outputs, problem = [None] * len(procs), None
    try:
        for i, proc in enumerate(procs):
            try:
                outputs[i] = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
            except subprocess.TimeoutExpired:
                problem = f"timed out after {TIMEOUT_S} s (a rank deadlocked?)"
                break
            if proc.returncode != 0:
                problem = f"exited with status {proc.returncode}"
                break
    finally:
        if problem is not None or any(output is None for output in outputs):  # failed or interrupted
            for proc in procs:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            outputs = [output if output is not None else proc.communicate()[0] for proc, output in zip(procs, outputs)]
    if problem is not None:
        pytest.fail(f"{problem}:\n" + "\n".join(f"--- {' '.join(proc.args)}\n{output}" for proc, output in zip(procs, outputs)))
    return outputs


class Run:
    """A finished training run: its folder, the train losses per iteration, its checkpoint."""

    def __init__(self, run_dir, outputs):
        self.run_dir = run_dir
        self.stdout = "".join(outputs)
        self.out_dir = run_dir / "out"
        with open(self.out_dir / "metrics.jsonl", encoding="utf-8") as f:
            self.events = [json.loads(line) for line in f]
        train = [e for e in self.events if e["event"] == "train"]
        self.iters = [e["iter"] for e in train]
        self.losses = [e["loss"] for e in train]
        self.checkpoint = torch.load(self.out_dir / "ckpt.pt", map_location="cpu", weights_only=True)


def train_args(data_dir, optimizer, accumulation):
    """train.py by its full path: each run works in its own empty folder, so anything a rank writes
    outside out_dir shows up there."""
    return [os.path.join(REPO, "train.py"), *TINY, *OPTIMIZERS[optimizer], f"--data_dir={data_dir}", "--out_dir=out",
            f"--gradient_accumulation_steps={accumulation}", f"--hess_accumulation_steps={accumulation}"]


def one_process(args):
    return [[sys.executable, *args]]


def two_processes(args):
    return [[*TORCHRUN, "--standalone", "--nproc_per_node=2", *args]]


def two_nodes(args):
    """Two single-process "nodes" on localhost, launched as on two machines (the default static
    rendezvous: node 0's launcher serves master_addr:master_port)."""
    port = free_port()
    return [[*TORCHRUN, "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node_rank}", "--master_addr=127.0.0.1",
             f"--master_port={port}", *args] for node_rank in (0, 1)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    """runs(launch, optimizer, accumulation): a finished training run, each trained once per module
    and shared by the tests that compare against it."""
    root = tmp_path_factory.mktemp("ddp_runs")
    done = {}

    def get(launch, optimizer, accumulation=1):
        key = (launch.__name__, optimizer, accumulation)
        if key not in done:
            run_dir = root / "_".join(map(str, key))
            run_dir.mkdir()
            done[key] = Run(run_dir, run_all(launch(train_args(tiny_data, optimizer, accumulation)), cwd=run_dir))
        return done[key]
    return get


def assert_same_training(run, reference):
    assert run.iters == reference.iters == list(range(6))
    assert run.losses == pytest.approx(reference.losses, rel=1e-6, abs=1e-5)  # the losses are ~10.8
    assert_same_tensors(run.checkpoint["model"], reference.checkpoint["model"], "weight")
    states, reference_states = run.checkpoint["optimizer"]["state"], reference.checkpoint["optimizer"]["state"]
    assert states.keys() == reference_states.keys()
    for index, state in states.items():
        assert_same_tensors(state, reference_states[index], f"optimizer state of parameter {index}:")


def assert_same_tensors(tensors, reference, what):
    assert tensors.keys() == reference.keys()
    for name, value in tensors.items():
        # the Hessian EMA is ~1e-8 on some parameters: compare it relative to its own scale
        atol = 1e-5 * min(1.0, reference[name].abs().max().item()) if name == "hessian" else 1e-5
        torch.testing.assert_close(value, reference[name], rtol=1e-4, atol=atol, msg=lambda m: f"{what} {name}: {m}")


def assert_only_rank0_wrote(run, world_size):
    """One metrics.jsonl in the whole run folder, written by one process (one config event, each
    evaluation once), nothing else but the checkpoint, and one process printing, for all of them."""
    logs = sorted(p.relative_to(run.run_dir) for p in run.run_dir.rglob("metrics.jsonl"))
    assert [str(p) for p in logs] == [os.path.join("out", "metrics.jsonl")]
    assert sorted(p.name for p in run.out_dir.iterdir()) == ["ckpt.pt", "metrics.jsonl"]
    assert [e["event"] for e in run.events].count("config") == 1
    assert [e["iter"] for e in run.events if e["event"] == "eval"] == [0, 6]
    assert sorted(p.name for p in run.run_dir.iterdir()) == ["out"]
    assert run.stdout.count("tokens per optimizer step") == 1
    assert f"x 1 accumulation x {world_size} processes" in run.stdout


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_two_processes_train_like_one_process_with_twice_the_accumulation(runs, optimizer):
    two = runs(two_processes, optimizer)
    assert_same_training(two, runs(one_process, optimizer, accumulation=2))
    assert_only_rank0_wrote(two, world_size=2)


def test_ranks_train_on_different_batches(runs):
    """If both ranks drew the same windows, 2 processes would train like 1 process with
    accumulation 1; they must not (and the 2-micro-batch reference must not either)."""
    two, single_batch = runs(two_processes, "adamw"), runs(one_process, "adamw")
    assert two.losses[0] != pytest.approx(single_batch.losses[0], rel=1e-6, abs=1e-5)
    assert runs(one_process, "adamw", accumulation=2).losses[0] != pytest.approx(single_batch.losses[0], rel=1e-6, abs=1e-5)
    assert not torch.allclose(two.checkpoint["model"]["lm_head.weight"], single_batch.checkpoint["model"]["lm_head.weight"],
                              rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("launch, world_size, accumulation", [(one_process, 1, 2), (two_processes, 2, 1)])
def test_mfu_is_one_processs_tokens_against_one_devices_peak(runs, launch, world_size, accumulation):
    """tokens_per_sec counts every rank's tokens, but the peak is one device's: MFU divides by the
    number of processes, or 8 GPUs at 40% each would report 320%."""
    run = runs(launch, "adamw", accumulation)
    peak = [e for e in run.events if e["event"] == "peak_flops"][0]["flops"]
    flops_per_token = ckpt.model_from(run.checkpoint).flops_per_token()
    for step in (e for e in run.events if e["event"] == "train"):
        assert step["mfu"] == pytest.approx(flops_per_token * step["tokens_per_sec"] / world_size / peak, rel=1e-9)


def test_two_nodes_train_like_two_processes_on_one_node(runs):
    """--nnodes=2 with one process each, the multi-node launch, on localhost: both launchers exit 0
    (no rank deadlocked), only global rank 0 writes, and the training is the single-node one. Each
    node's process has LOCAL_RANK 0, so data split by LOCAL_RANK instead of RANK would fail here."""
    nodes = runs(two_nodes, "sophiag")
    assert_same_training(nodes, runs(two_processes, "sophiag"))
    assert_same_training(nodes, runs(one_process, "sophiag", accumulation=2))
    assert_only_rank0_wrote(nodes, world_size=2)


def test_resuming_on_a_node_that_does_not_see_the_checkpoint_says_why(tmp_path, monkeypatch):
    """Rank 0 alone writes ckpt.pt: a node whose --out_dir is its own local folder has none to resume."""
    from types import SimpleNamespace

    import train
    from opengpt import run_setup
    from opengpt.cli import UserError

    monkeypatch.setenv("RANK", "8")  # the first process of the second node of 8 processes each
    monkeypatch.setenv("LOCAL_RANK", "0")
    cfg = train.DEFAULTS | dict(init_from="resume", out_dir=str(tmp_path))
    with pytest.raises(UserError, match=f"{tmp_path / 'ckpt.pt'} is not on this node \\(rank 8\\): rank 0 alone writes "
                                        "checkpoints, so with several nodes --out_dir must be a folder every node sees"):
        run_setup.build_model(cfg, SimpleNamespace(padded_vocab_size=64), "data", SimpleNamespace(eot_token=0))
    monkeypatch.setenv("RANK", "3")  # a process of the first node: the usual message, as in one process
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(UserError, match="not found"):
        run_setup.build_model(cfg, SimpleNamespace(padded_vocab_size=64), "data", SimpleNamespace(eot_token=0))


def test_a_resumed_two_process_run_with_dropout_is_the_uninterrupted_run(tmp_path, tiny_data):
    """Each rank draws its own dropout masks: a checkpoint keeps every rank's random state, not rank 0's
    alone (rank 1 resumed from its seed, replaying the masks of iteration 0)."""
    args = [*train_args(tiny_data, "adamw", 1), "--dropout=0.1", "--eval_interval=3"]
    (tmp_path / "straight").mkdir()
    (tmp_path / "parts").mkdir()
    straight = Run(tmp_path / "straight", run_all(two_processes(args), cwd=tmp_path / "straight"))
    run_all(two_processes([*args, "--max_iters=3"]), cwd=tmp_path / "parts")
    resumed = Run(tmp_path / "parts", run_all(two_processes([*args, "--init_from=resume"]), cwd=tmp_path / "parts"))
    assert resumed.iters == straight.iters == list(range(6))
    assert resumed.losses == straight.losses
    assert_same_tensors(resumed.checkpoint["model"], straight.checkpoint["model"], "weight")

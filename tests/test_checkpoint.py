"""Resuming on another machine or with another dtype: what restore_training_state keeps from the
checkpoint (what the optimizer learnt, the random states) and what it keeps from this run (how the
optimizer runs here, a GradScaler the checkpoint did not use, the GPUs this machine has)."""
import copy
import io
import random
import types

import numpy as np
import pytest
import torch

from opengpt import checkpoint as ckpt
from opengpt import optimizers
import train
from model import GPT, GPTConfig


def tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64, dropout=0.0, bias=True))


def loss_of(model):
    x, y = torch.randint(0, 64, (2, 2, 8), generator=torch.Generator().manual_seed(1))
    return model(x, y)[1]


def muon(model):
    """train.py's --optimizer=muon, with its default settings."""
    return optimizers.REGISTRY["muon"].build(model, dict(train.DEFAULTS, learning_rate=1e-2), "cpu")


def saved_run(optimizer_kwargs, scaler_enabled=False, optimizer_name="adamw"):
    """(model, checkpoint) after one optimizer step."""
    model = tiny_model()
    if optimizer_name == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, **optimizer_kwargs)
    else:
        optimizer = muon(model)
    loss_of(model).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler("cpu", enabled=scaler_enabled)
    tokenizer = types.SimpleNamespace(spec={})  # what the checkpoint records of it does not matter here
    state = ckpt.training_state(model, optimizer, scaler, {}, 1, 0.0, {}, torch.Generator(), tokenizer, torch.Generator())
    buffer = io.BytesIO()  # through bytes, as on disk: the loaded tensors are the checkpoint's own
    torch.save(state, buffer)
    buffer.seek(0)
    return model, torch.load(buffer, weights_only=True)


def resumed(state, optimizer, scaler):
    # rank 1: the process-local random states are left alone (rank 0's are tested below)
    ckpt.restore_training_state(state, optimizer, scaler, torch.Generator(), torch.Generator(), rank=1)


@pytest.mark.parametrize("saved, here", [(dict(foreach=True), dict(fused=True)), (dict(fused=True), dict(foreach=True))])
def test_the_optimizer_keeps_its_own_fused_or_foreach_setting(saved, here):
    """A CPU run's checkpoint (foreach) resumed where AdamW is fused (CUDA) stays fused, and the other
    way round; what AdamW learnt is loaded all the same, and a float16 step with a GradScaler runs
    (foreach=True copied over a fused AdamW fails there: the foreach path takes no grad scale)."""
    model, state = saved_run(saved, scaler_enabled=True)
    reference = torch.optim.AdamW(model.parameters(), lr=1e-2, **saved)
    reference.load_state_dict(copy.deepcopy(state["optimizer"]))  # loading shares the tensors it is given

    resumed_model = tiny_model()
    resumed_model.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(resumed_model.parameters(), lr=1e-2, **here)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    resumed(state, optimizer, scaler)
    assert [(g.get("fused"), g.get("foreach")) for g in optimizer.param_groups] == [(here.get("fused"), here.get("foreach"))]

    scaler.scale(loss_of(resumed_model)).backward()
    scaler.step(optimizer)
    loss_of(model).backward()
    reference.step()
    for resumed_param, param in zip(resumed_model.parameters(), model.parameters()):
        torch.testing.assert_close(resumed_param, param, rtol=1e-5, atol=1e-6)


def test_resuming_into_float16_from_a_run_without_it_starts_a_fresh_grad_scaler():
    _, state = saved_run(dict(foreach=True), scaler_enabled=False)
    assert state["scaler"] == {}  # what an off GradScaler saves
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    resumed(state, torch.optim.AdamW(tiny_model().parameters(), foreach=True), scaler)
    assert scaler.is_enabled() and scaler.get_scale() == 2.0**16


def test_a_float16_runs_grad_scaler_is_restored():
    _, state = saved_run(dict(foreach=True), scaler_enabled=True)
    state["scaler"]["scale"] = 128.0
    scaler = torch.amp.GradScaler("cpu")
    resumed(state, torch.optim.AdamW(tiny_model().parameters(), foreach=True), scaler)
    assert scaler.get_scale() == 128.0


def test_muons_learning_rate_schedule_still_reaches_it_after_a_resume():
    _, state = saved_run({}, optimizer_name="muon")
    optimizer = muon(tiny_model())
    resumed(state, optimizer, torch.amp.GradScaler("cpu", enabled=False))
    for group in optimizer.param_groups:  # what train.py's schedule does every step
        group["lr"] = 0.123
    assert all(g["lr"] == 0.123 for g in optimizer.muon.param_groups + optimizer.adamw.param_groups)


def test_cuda_random_states_of_more_gpus_than_this_machine_has(monkeypatch):
    """A checkpoint from an 8-GPU machine resumed on 1 GPU restores GPU 0's state and no other."""
    _, state = saved_run(dict(foreach=True))
    state["rng"]["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    restored = []

    def set_rng_state(new_state, device="cuda"):
        if device >= 1:
            raise RuntimeError(f"invalid device ordinal {device}")  # what CUDA says
        restored.append((int(new_state[0]), device))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            ckpt.restore_training_state(state, torch.optim.AdamW(tiny_model().parameters(), foreach=True),
                                        torch.amp.GradScaler("cpu", enabled=False), torch.Generator(), torch.Generator(),
                                        rank=0)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
    assert restored == [(0, 0)]


def test_the_hessian_stream_is_saved_and_restored_with_the_batches():
    """Every checkpoint holds the Hessian pass's generator: a resumed SophiaG run draws the same windows and labels."""
    hessian = torch.Generator().manual_seed(7)
    torch.randint(10, (3,), generator=hessian)  # somewhere in its stream
    model = tiny_model()
    state = ckpt.training_state(model, torch.optim.AdamW(model.parameters()), torch.amp.GradScaler("cpu", enabled=False),
                                {}, 1, 0.0, {}, torch.Generator(), types.SimpleNamespace(spec={}), hessian)
    restored = torch.Generator()
    ckpt.restore_training_state(state, torch.optim.AdamW(tiny_model().parameters()), torch.amp.GradScaler("cpu", enabled=False),
                                torch.Generator(), restored, rank=1)
    assert torch.equal(torch.randint(2**30, (4,), generator=restored), torch.randint(2**30, (4,), generator=hessian))


@pytest.mark.parametrize("record", [None, "gpt2", {"kind": "sentencepiece"}])
def test_a_checkpoint_without_a_tokenizer_record_of_this_format_is_refused(record):
    """No default tokenizer for a checkpoint that records none (no released version saved one without)."""
    with pytest.raises(ckpt.UserError, match="the checkpoint's tokenizer cannot be loaded"):
        ckpt.tokenizer_of({} if record is None else {"tokenizer": record})

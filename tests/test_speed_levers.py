"""Speed levers must not change results. The chunked head loss, its sampler, bf16 autocast and the KV
cache have their own tests (test_model.py, test_sophia.py); here: torch.compile and the allocator
setting train.py makes on CPUs."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from opengpt import hardware
from opengpt.head_loss import linear_cross_entropy, linear_cross_entropy_and_sampled
from opengpt.cli import UserError
from conftest import REPO
from model import GPT, GPTConfig

# A few AdamW steps of a tiny model with the real 50304-row head: its logits chunks are megabytes,
# so they come from the allocator paths the setting changes. Prints the losses and a weight checksum.
TRAINING_STEPS = f"""
import json, sys
sys.path.insert(0, {REPO!r})
import torch, train
from opengpt import hardware, optimizers
from model import GPT, GPTConfig
if sys.argv[1] == "keep":
    assert hardware.keep_freed_memory()
torch.manual_seed(0)
model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50304, dropout=0.1, bias=True))
optimizer = optimizers.REGISTRY["adamw"].build(model, train.DEFAULTS | dict(learning_rate=1e-3), "cpu")
losses = []
for _ in range(4):
    x, y = torch.randint(0, 50257, (2, 4, 16))
    _, loss = model(x, y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    losses.append(loss.item())
print(json.dumps(losses + [sum(p.double().sum().item() for p in model.parameters())]))
"""


def test_keeping_freed_memory_changes_no_result():
    # identical bits either way: a difference would mean some kernel reads memory it never wrote
    outputs = [subprocess.run([sys.executable, "-c", TRAINING_STEPS, mode], capture_output=True, text=True, timeout=120)
               for mode in ("default", "keep")]
    for result in outputs:
        assert result.returncode == 0, result.stderr
    assert json.loads(outputs[0].stdout) == json.loads(outputs[1].stdout)


def test_compiled_model_gives_the_eager_loss_and_gradients():
    try:
        hardware.check_compile_works("cpu")
    except UserError as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=320, dropout=0.0, bias=True))
    x, y = torch.randint(0, 300, (2, 4, 16))
    results = []
    for candidate in (model, torch.compile(model)):
        _, loss = candidate(x, y)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad(set_to_none=True)
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for compiled, eager in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)


def compiled_or_skip(fn):
    try:
        hardware.check_compile_works("cpu")
    except UserError as e:
        pytest.skip(str(e))
    return torch.compile(fn, fullgraph=True)


def test_compiled_head_loss_gives_cross_entropy_of_the_logits_in_value_and_gradients():
    # compiled, the head loss writes its softmax out and takes the log-sum-exp from its row sum
    # (head_loss.py): checked against F.cross_entropy in float64, chunks of 7 rows, ignored
    # positions, logits hundreds apart, and the loss on drawn labels that shares the pass
    torch.manual_seed(1)
    hidden = (torch.randn(20, 8, dtype=torch.float64) * 30).requires_grad_()
    weight = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (20,))
    targets[[2, 11]] = -1
    both = compiled_or_skip(lambda h, w, t: linear_cross_entropy_and_sampled(h, w, t, 48, chunk_rows=7))
    loss, sampled, labels = both(hidden, weight, targets)
    grads = torch.autograd.grad(loss + 0.5 * sampled, (hidden, weight))
    h_ref, w_ref = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    logits = h_ref @ w_ref.t()
    expected = F.cross_entropy(logits, targets, ignore_index=-1)
    expected_sampled = F.cross_entropy(logits, torch.where(targets == -1, -1, labels), ignore_index=-1)
    expected_grads = torch.autograd.grad(expected + 0.5 * expected_sampled, (h_ref, w_ref))
    assert labels.max() < 48
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sampled, expected_sampled, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_compiled_head_loss_under_bfloat16_autocast_stays_close_to_float64():
    torch.manual_seed(2)
    hidden = torch.randn(64, 32, requires_grad=True)
    weight = (torch.randn(500, 32) * 0.2).requires_grad_()
    targets = torch.randint(0, 500, (64,))

    def loss_fn(h, w, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return linear_cross_entropy(h, w, t)
    loss = compiled_or_skip(loss_fn)(hidden, weight, targets)
    grads = torch.autograd.grad(loss, (hidden, weight))
    h_ref, w_ref = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    expected = F.cross_entropy(h_ref @ w_ref.t(), targets)
    expected_grads = torch.autograd.grad(expected, (h_ref, w_ref))
    assert loss.dtype == torch.float32 and grads[0].dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=1e-2, atol=1e-2)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want, rtol=5e-2, atol=2e-3)

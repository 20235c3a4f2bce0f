"""Speed levers must not change results. The chunked head loss, its sampler, bf16 autocast and the KV
cache have their own tests (test_model.py, test_sophia.py); here: torch.compile and the allocator
setting train.py makes on CPUs."""
import json
import subprocess
import sys

import pytest
import torch

from opengpt import hardware
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

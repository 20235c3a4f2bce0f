"""The optimizer registry: one home for every optimizer, the weight-decay split it builds, and the
model kept free of optimizer code."""
import subprocess
import sys

import pytest
import torch

from opengpt import optimizers
import train
from conftest import REPO
from model import GPT, GPTConfig

TINY = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=64, bias=True)
EMBEDDINGS = {"transformer.wte.weight", "transformer.wpe.weight"}  # wte is also the head's weight


def decay_by_name(model, optimizer):
    """{parameter name: the weight decay of the group holding it}; every parameter exactly once."""
    decay = {}
    groups = optimizer.adamw.param_groups + optimizer.muon.param_groups if hasattr(optimizer, "muon") else optimizer.param_groups
    names = {id(p): name for name, p in model.named_parameters()}
    for group in groups:
        for p in group["params"]:
            assert names[id(p)] not in decay, f"{names[id(p)]} is in two groups"
            decay[names[id(p)]] = group["weight_decay"]
    assert set(decay) == set(names.values())
    return decay


@pytest.mark.parametrize("name", list(optimizers.REGISTRY))
@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_embeddings_are_decayed_only_when_asked_for_every_optimizer(name, decay_embeddings):
    """decay_embeddings=True is nanoGPT's split (every matrix decays); False is the Sophia authors'
    (wte, wpe and so the tied head do not), for AdamW, SophiaG and Muon alike. Biases and
    LayerNorm weights never decay."""
    torch.manual_seed(0)
    model = GPT(TINY)
    cfg = train.DEFAULTS | dict(optimizer=name, weight_decay=0.3, decay_embeddings=decay_embeddings)
    decay = decay_by_name(model, optimizers.REGISTRY[name].build(model, cfg, "cpu"))
    for param_name, p in model.named_parameters():
        if param_name in EMBEDDINGS:
            expected = 0.3 if decay_embeddings else 0.0
        else:
            expected = 0.3 if p.dim() >= 2 else 0.0
        assert decay[param_name] == expected, param_name


@pytest.mark.parametrize("name", ["adamw", "sophiag"])
def test_an_undecayed_embedding_does_not_shrink(name):
    """One step with zero gradients moves a parameter only by its weight decay: the Linear weights
    shrink by (1 - lr * weight_decay), the embeddings stay put when decay_embeddings=False."""
    torch.manual_seed(0)
    model = GPT(TINY)
    cfg = train.DEFAULTS | dict(optimizer=name, learning_rate=0.1, weight_decay=0.5, decay_embeddings=False)
    optimizer = optimizers.REGISTRY[name].build(model, cfg, "cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step(**optimizers.REGISTRY[name].step_kwargs(64))
    after = dict(model.named_parameters())
    torch.testing.assert_close(after["transformer.wte.weight"], before["transformer.wte.weight"], rtol=0, atol=0)
    torch.testing.assert_close(after["transformer.wpe.weight"], before["transformer.wpe.weight"], rtol=0, atol=0)
    weight = "transformer.h.0.mlp.c_fc.weight"
    torch.testing.assert_close(after[weight], before[weight] * (1 - 0.1 * 0.5))


def test_the_gpt2_configs_follow_the_sophia_authors_on_weight_decay():
    import glob

    from configurator import parse_args

    paths = sorted(glob.glob(f"{REPO}/config/train_gpt2_*.py"))
    assert len(paths) == 6
    for path in paths:
        assert parse_args(train.DEFAULTS, [path])["decay_embeddings"] is False, path


def test_every_registered_optimizer_builds_and_steps():
    torch.manual_seed(0)
    for name, spec in optimizers.REGISTRY.items():
        model = GPT(TINY)
        optimizer = spec.build(model, train.DEFAULTS | dict(optimizer=name), "cpu")
        _, loss = model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
        loss.backward()
        before = model.lm_head.weight.detach().clone()
        optimizer.step(**spec.step_kwargs(16))
        assert not torch.equal(before, model.lm_head.weight), name
        assert spec.label and spec.run_label({"optimizer": name, "hess_interval": 10})


def test_the_choices_sentence_names_every_optimizer():
    assert optimizers.choices() == "adamw, sophiag or muon"


def test_the_model_imports_no_optimizer_code():
    code = "import sys, model; print(sorted(m for m in ('opengpt.optimizers', 'sophia', 'opengpt.muon') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_sophiag_steps_compiled_when_the_model_is():
    for compile_model in (False, True):
        cfg = train.DEFAULTS | dict(optimizer="sophiag", compile=compile_model)
        assert optimizers.REGISTRY["sophiag"].build(GPT(TINY), cfg, "cpu").compiled == compile_model

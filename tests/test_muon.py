"""opengpt.muon.BlockwiseMuon against torch.optim.Muon (the reference: PyTorch's own implementation),
and its orthogonalisation against the SVD."""
import copy

import torch

from opengpt import optimizers
import train
from model import GPT, GPTConfig
from opengpt.muon import BlockwiseMuon, orthogonalise

SETTINGS = dict(lr=0.02, weight_decay=0.1, momentum=0.9)
BF16 = dict(ns_dtype=torch.bfloat16)  # torch.optim.Muon iterates in bfloat16 on every device


def steps(optimizer, params, grads):
    for grad in grads:
        for p, g in zip(params, grad):
            p.grad = g.clone()
        optimizer.step()


def random_grads(shapes, count=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(count)]


def test_orthogonalise_gives_singular_values_near_one_and_the_svds_directions():
    update = torch.randn(96, 32, generator=torch.Generator().manual_seed(0))
    result = orthogonalise(update).float()
    u, _, vh = torch.linalg.svd(update, full_matrices=False)
    singular_values = torch.linalg.svdvals(result)
    assert result.shape == update.shape and 0.6 < singular_values.min() and singular_values.max() < 1.25
    # the polar factor U V^T is what the iteration approximates: cosine similarity close to 1
    cosine = (result * (u @ vh)).sum() / (result.norm() * (u @ vh).norm())
    assert cosine > 0.97


def test_an_unstacked_matrix_steps_as_torch_muon():
    shapes = [(64, 32), (32, 96)]
    ours = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    theirs = copy.deepcopy(ours)
    grads = random_grads(shapes)
    steps(BlockwiseMuon(ours, **BF16, **SETTINGS), ours, grads)
    steps(torch.optim.Muon(theirs, adjust_lr_fn="match_rms_adamw", **SETTINGS), theirs, grads)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=2e-4), (a - b).abs().max()


def test_its_learning_rate_scaling_is_the_one_its_groups_record_as_torch_muon_reads_it():
    """adjust_lr_fn is in the parameter groups (and so in checkpoints): step() applies what it says,
    "original" as torch.optim.Muon does, whether set here or loaded with a torch.optim.Muon state."""
    shapes = [(64, 32), (32, 96)]
    start = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    ours, loaded, theirs = (copy.deepcopy(start) for _ in range(3))
    grads = random_grads(shapes)
    reference = torch.optim.Muon(theirs, adjust_lr_fn="original", **SETTINGS)
    steps(BlockwiseMuon(ours, adjust_lr_fn="original", **BF16, **SETTINGS), ours, grads)
    resumed = BlockwiseMuon(loaded, **BF16, **SETTINGS)
    resumed.load_state_dict(copy.deepcopy(reference.state_dict()))
    assert resumed.param_groups[0]["adjust_lr_fn"] == "original"
    steps(resumed, loaded, grads)
    steps(reference, theirs, grads)
    for a, b, c in zip(ours, loaded, theirs):
        assert torch.allclose(a, c, atol=2e-4) and torch.allclose(b, c, atol=2e-4), (a - c).abs().max()
    default = [p.clone() for p in start]
    steps(BlockwiseMuon(default, **BF16, **SETTINGS), default, grads)
    assert not torch.allclose(default[1], theirs[1], atol=1e-3)  # match_rms_adamw is another step


def test_a_stacked_matrix_steps_as_torch_muon_on_its_blocks_apart():
    weight = torch.randn(3 * 32, 32, generator=torch.Generator().manual_seed(0))
    blocks = [b.clone() for b in weight.chunk(3)]
    grads = random_grads([weight.shape])
    steps(BlockwiseMuon([weight], stacked={weight: 3}, **BF16, **SETTINGS), [weight], grads)
    steps(torch.optim.Muon(blocks, adjust_lr_fn="match_rms_adamw", **SETTINGS), blocks,
          [list(g[0].chunk(3)) for g in grads])
    assert torch.allclose(weight, torch.cat(blocks), atol=2e-4)
    # and not as the stack orthogonalised whole
    whole = torch.randn(3 * 32, 32, generator=torch.Generator().manual_seed(0))
    steps(torch.optim.Muon([whole], adjust_lr_fn="match_rms_adamw", **SETTINGS), [whole], grads)
    assert not torch.allclose(weight, whole, atol=1e-3)


def test_the_recipe_orthogonalises_query_key_and_value_apart_with_its_momentum():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=64))
    optimizer = optimizers.REGISTRY["muon"].build(model, dict(train.DEFAULTS, muon_momentum=0.8), "cpu")
    stacked = {id(block.attn.c_attn.weight) for block in model.transformer.h}
    assert optimizer.muon.stacked == {i: 3 for i in stacked}
    assert all(group["momentum"] == 0.8 for group in optimizer.muon.param_groups)


def test_a_checkpoint_of_torch_muon_loads_and_steps_the_same():
    params = [torch.randn(32, 64, generator=torch.Generator().manual_seed(0))]
    grads = random_grads([params[0].shape], count=4)
    theirs = torch.optim.Muon(params, adjust_lr_fn="match_rms_adamw", **SETTINGS)
    steps(theirs, params, grads[:2])
    resumed = [params[0].clone()]
    ours = BlockwiseMuon(resumed, **BF16, **SETTINGS)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))  # as torch.load gives it: no shared buffers
    steps(theirs, params, grads[2:])
    steps(ours, resumed, grads[2:])
    assert torch.allclose(params[0], resumed[0], atol=2e-4)


def test_step_returns_the_closures_loss_computed_with_gradients():
    weight = torch.nn.Parameter(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)))
    optimizer = BlockwiseMuon([weight], **SETTINGS)

    def closure():
        optimizer.zero_grad()
        loss = weight.square().sum()
        loss.backward()
        return loss

    before = weight.detach().clone()
    assert optimizer.step(closure) == before.square().sum()
    assert not torch.equal(weight, before)


def newton_schulz_float64(update, steps=5, coefficients=(3.4445, -4.7750, 2.0315)):
    """The quintic iteration as Jordan et al. write it, in float64, on the smaller Gram matrix."""
    a, b, c = coefficients
    x = update.double() if update.size(0) <= update.size(1) else update.double().T
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if update.size(0) <= update.size(1) else x.T


def test_orthogonalise_in_float32_follows_the_iteration_closer_than_bfloat16():
    update = torch.randn(48, 80, generator=torch.Generator().manual_seed(0))
    exact = newton_schulz_float64(update)
    error32 = (orthogonalise(update, dtype=torch.float32).double() - exact).abs().max()
    error16 = (orthogonalise(update, dtype=torch.bfloat16).double() - exact).abs().max()
    assert error32 < 1e-4 and error32 < error16 / 10, (error32, error16)


def test_a_stack_is_orthogonalised_matrix_by_matrix():
    generator = torch.Generator().manual_seed(0)
    for shape in ((4, 24, 40), (3, 40, 24)):  # wide and tall
        stack = torch.randn(shape, generator=generator)
        alone = torch.stack([orthogonalise(m, dtype=torch.float32) for m in stack])
        assert torch.allclose(orthogonalise(stack, dtype=torch.float32), alone, atol=1e-6)


def test_matrices_stepped_together_step_as_each_alone():
    """The batched step (matrices of one shape orthogonalised as one stack) against one optimizer per matrix."""
    shapes = [(32, 16), (32, 16), (16, 48), (48, 16)]
    together = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    apart = copy.deepcopy(together)
    grads = random_grads(shapes)
    steps(BlockwiseMuon(together, stacked={together[2]: 2}, ns_dtype=torch.float32, **SETTINGS), together, grads)
    for i, p in enumerate(apart):
        steps(BlockwiseMuon([p], stacked={p: 2} if i == 2 else None, ns_dtype=torch.float32, **SETTINGS), [p],
              [[g[i]] for g in grads])
    for a, b in zip(together, apart):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()


def test_newton_schulz_runs_in_float32_on_a_cpu_without_native_bfloat16(monkeypatch):
    from opengpt import hardware
    from opengpt.muon import newton_schulz_dtype

    monkeypatch.setattr(hardware, "cpu_has_bf16_matmul", lambda: False)
    assert newton_schulz_dtype(torch.device("cpu")) == torch.float32
    assert newton_schulz_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(hardware, "cpu_has_bf16_matmul", lambda: True)
    assert newton_schulz_dtype(torch.device("cpu")) == torch.bfloat16

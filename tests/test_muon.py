"""opengpt.muon.BlockwiseMuon against torch.optim.Muon (the reference: PyTorch's own implementation),
and its orthogonalisation against the SVD."""
import copy

import torch

from opengpt import optimizers
import train
from model import GPT, GPTConfig
from opengpt.muon import BlockwiseMuon, orthogonalise

SETTINGS = dict(lr=0.02, weight_decay=0.1, momentum=0.9)


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
    steps(BlockwiseMuon(ours, **SETTINGS), ours, grads)
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
    steps(BlockwiseMuon(ours, adjust_lr_fn="original", **SETTINGS), ours, grads)
    resumed = BlockwiseMuon(loaded, **SETTINGS)
    resumed.load_state_dict(copy.deepcopy(reference.state_dict()))
    assert resumed.param_groups[0]["adjust_lr_fn"] == "original"
    steps(resumed, loaded, grads)
    steps(reference, theirs, grads)
    for a, b, c in zip(ours, loaded, theirs):
        assert torch.allclose(a, c, atol=2e-4) and torch.allclose(b, c, atol=2e-4), (a - c).abs().max()
    default = [p.clone() for p in start]
    steps(BlockwiseMuon(default, **SETTINGS), default, grads)
    assert not torch.allclose(default[1], theirs[1], atol=1e-3)  # match_rms_adamw is another step


def test_a_stacked_matrix_steps_as_torch_muon_on_its_blocks_apart():
    weight = torch.randn(3 * 32, 32, generator=torch.Generator().manual_seed(0))
    blocks = [b.clone() for b in weight.chunk(3)]
    grads = random_grads([weight.shape])
    steps(BlockwiseMuon([weight], stacked={weight: 3}, **SETTINGS), [weight], grads)
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
    ours = BlockwiseMuon(resumed, **SETTINGS)
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

import math

import pytest
import torch
import torch.nn.functional as F

from opengpt.head_loss import linear_cross_entropy, linear_cross_entropy_and_sampled, sampled_label_cross_entropy
from model import GPT, GPTConfig


def tiny_gpt(**overrides):
    torch.manual_seed(0)
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=320, dropout=0.0, bias=True) | overrides
    return GPT(GPTConfig(**args)).eval()


def test_output_shapes():
    model = tiny_gpt()
    idx = torch.randint(0, 320, (3, 10))
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 320) and loss is None
    logits, loss = model(idx, idx)
    assert logits is None and loss.shape == ()
    assert model.full_logits(idx).shape == (3, 10, 320)


def test_loss_at_initialisation_is_near_uniform():
    model = tiny_gpt(vocab_size=50304, n_embd=64)
    idx = torch.randint(0, 50257, (4, 16))
    _, loss = model(idx, torch.randint(0, 50257, (4, 16)))
    assert abs(loss.item() - math.log(50304)) < 0.1


def test_loss_equals_cross_entropy_of_the_full_logits():
    model = tiny_gpt()
    idx, targets = torch.randint(0, 320, (2, 16)), torch.randint(0, 320, (2, 16))
    _, loss = model(idx, targets)
    expected = F.cross_entropy(model.full_logits(idx).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk_rows", [3, 7, 1000])
def test_chunked_head_loss_matches_the_materialised_logits_in_value_and_gradients(chunk_rows):
    torch.manual_seed(1)
    hidden = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (20,))
    targets[[2, 11]] = -1  # ignored positions
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows)
    loss.backward()
    h_ref, w_ref = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    expected = F.cross_entropy(h_ref @ w_ref.t(), targets, ignore_index=-1)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hidden.grad, h_ref.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(weight.grad, w_ref.grad, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # evaluation skips the gradient work but gives the same value
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows), expected.detach())


@pytest.mark.parametrize("chunk_rows", [3, 1000])
def test_the_training_loss_and_a_drawn_labels_loss_in_one_pass_each_have_their_own_gradients(chunk_rows):
    torch.manual_seed(4)
    hidden = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(64, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 60, (20,))
    targets[[2, 11]] = -1  # ignored positions: left out of both losses
    loss, sampled, labels = linear_cross_entropy_and_sampled(hidden, weight, targets, 60, torch.Generator().manual_seed(5),
                                                            chunk_rows=chunk_rows)
    # the labels are those the Hessian pass alone would draw from the same softmax and generator
    _, alone = sampled_label_cross_entropy(hidden, weight, 60, torch.Generator().manual_seed(5), chunk_rows=chunk_rows)
    assert torch.equal(labels, alone) and labels.max() < 60
    sampled_grads = torch.autograd.grad(sampled, (hidden, weight), retain_graph=True)
    loss.backward()
    h_ref, w_ref = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    logits = h_ref @ w_ref.t()
    expected = F.cross_entropy(logits, targets, ignore_index=-1)
    expected_sampled = F.cross_entropy(logits, torch.where(targets == -1, -1, labels), ignore_index=-1)
    expected_sampled_grads = torch.autograd.grad(expected_sampled, (h_ref, w_ref), retain_graph=True)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sampled, expected_sampled, rtol=1e-12, atol=1e-12)
    for got, want in zip((hidden.grad, weight.grad, *sampled_grads), (h_ref.grad, w_ref.grad, *expected_sampled_grads)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_the_one_pass_losses_under_bfloat16_autocast_stay_close_to_float32():
    torch.manual_seed(6)
    hidden = torch.randn(64, 32, requires_grad=True)
    weight = (torch.randn(512, 32) * 0.2).requires_grad_()
    targets = torch.randint(0, 512, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, sampled, labels = linear_cross_entropy_and_sampled(hidden, weight, targets, 512, torch.Generator().manual_seed(0))
    sampled_grads = torch.autograd.grad(sampled, (hidden, weight), retain_graph=True)
    logits = hidden.detach() @ weight.detach().t()
    h_ref, w_ref = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    expected_grads = torch.autograd.grad(F.cross_entropy(h_ref @ w_ref.t(), labels), (h_ref, w_ref))
    assert sampled.dtype == torch.float32 and sampled_grads[0].dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(sampled, F.cross_entropy(logits, labels), rtol=2e-2, atol=2e-2)
    for got, want in zip(sampled_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-3)


def test_chunked_head_loss_stays_exact_where_a_targets_probability_underflows():
    # logits hundreds apart: a target's float32 softmax probability is exactly zero, its loss ~300 nats
    torch.manual_seed(3)
    hidden = (torch.randn(16, 8) * 30).requires_grad_()
    weight = torch.randn(40, 8).requires_grad_()
    targets = torch.randint(0, 40, (16,))
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=5)
    loss.backward()
    h_ref, w_ref = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    expected = F.cross_entropy(h_ref @ w_ref.t(), targets)
    expected.backward()
    assert torch.softmax(hidden.detach() @ weight.detach().t(), 1).gather(1, targets[:, None]).min() == 0
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(hidden.grad.double(), h_ref.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), w_ref.grad, rtol=1e-4, atol=1e-6)


def test_chunked_head_loss_under_bfloat16_autocast_stays_close_to_float32():
    torch.manual_seed(2)
    hidden = torch.randn(64, 32, requires_grad=True)
    weight = (torch.randn(500, 32) * 0.2).requires_grad_()
    targets = torch.randint(0, 500, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    expected = F.cross_entropy(hidden.detach() @ weight.detach().t(), targets)
    assert loss.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("scale_by_layer", [False, True])
def test_from_pretrained_matches_transformers_logits(tmp_path, scale_by_layer):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    hf_config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=24, vocab_size=300,
                                        scale_attn_by_inverse_layer_idx=scale_by_layer)
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    hf_model.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        diff = (ours.full_logits(idx) - hf_model(idx).logits).abs().max().item()
    assert diff < 1e-4


@pytest.mark.parametrize("setting", [dict(tie_word_embeddings=False), dict(scale_attn_weights=False),
                                     dict(layer_norm_epsilon=1e-2)])
def test_a_gpt2_folder_whose_settings_change_the_maths_is_refused(tmp_path, setting):
    """Each loaded into our GPT gave other logits than transformers' (an untied head even overwrote the
    embedding, which our GPT shares with it): refused instead."""
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=8, vocab_size=64, **setting)
    transformers.GPT2LMHeadModel(hf_config).save_pretrained(tmp_path)
    key, value = next(iter(setting.items()))
    with pytest.raises(ValueError, match=f"sets {key}={value}; only GPT-2's own"):
        GPT.from_pretrained(str(tmp_path))


def test_crop_block_size_shrinks_the_position_table():
    model = tiny_gpt()
    model.crop_block_size(8)
    assert model.transformer.wpe.weight.shape[0] == 8
    with pytest.raises(ValueError):
        model.crop_block_size(32)


def test_a_rotary_model_has_no_position_table_and_crops_its_block():
    model = tiny_gpt(rotary=True)
    assert "wpe" not in model.transformer
    model.crop_block_size(8)
    assert model.config.block_size == 8
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))


# rotary: the cache must carry on the positions
ARCHITECTURES = [dict(), dict(rotary=True), dict(rotary=True, activation="relu2")]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (1.0, 5), (0.8, None)])
def test_kv_cache_generates_the_same_tokens(temperature, top_k, architecture):
    model = tiny_gpt(**architecture)
    prompt = torch.randint(0, 320, (2, 5))
    outputs = []
    for use_cache in (True, False):
        generator = torch.Generator().manual_seed(42)
        outputs.append(model.generate(prompt, 30, temperature=temperature, top_k=top_k, generator=generator,
                                      use_cache=use_cache))
    assert outputs[0].shape == (2, 35)  # longer than block_size 16: the window slides
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_greedy_generation_follows_the_argmax_of_the_full_forward(architecture):
    # the reference: nanoGPT's loop, the whole cropped window through the model for every token
    model = tiny_gpt(**architecture)
    idx = torch.randint(0, 320, (2, 5))
    generated = model.generate(idx, 20, temperature=0.0)
    with torch.no_grad():
        for _ in range(20):
            next_token = model.full_logits(idx[:, -model.config.block_size:])[:, -1].argmax(-1, keepdim=True)
            idx = torch.cat((idx, next_token), dim=1)
    assert torch.equal(generated, idx)


def test_rotation_turns_each_pair_by_its_angle_as_complex_numbers_do():
    from model import rotate, rotation_angles

    torch.manual_seed(5)
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    positions = torch.arange(7)
    # the reference, from the definition: pair i = (x_i, x_{i + 4}) as a complex number, times
    # e^{i p theta_i} with theta_i = 10000^(-2i / 8)
    theta = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    turned = torch.complex(x[..., :4], x[..., 4:]) * torch.polar(torch.ones(7, 4, dtype=torch.float64),
                                                                 positions[:, None] * theta)
    expected = torch.cat((turned.real, turned.imag), dim=-1)
    torch.testing.assert_close(rotate(x, *rotation_angles(positions, 8)), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("activation, from_the_math", [
    ("gelu_new", lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))),
    ("relu2", lambda h: torch.where(h > 0, h * h, torch.zeros_like(h))),
])
def test_mlp_activation(activation, from_the_math):
    mlp = tiny_gpt(activation=activation).transformer.h[0].mlp
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), mlp.c_proj(from_the_math(mlp.c_fc(x))))


def test_rotary_attention_scores_depend_on_the_offset_only():
    from model import rotate, rotation_angles

    torch.manual_seed(6)
    q, k = torch.randn(2, 1, 1, 1, 16)
    def score(m, n):
        cos, sin = rotation_angles(torch.tensor([m, n]), 16)
        return (rotate(q, cos[:1], sin[:1]) * rotate(k, cos[1:], sin[1:])).sum()
    torch.testing.assert_close(score(7, 3), score(104, 100))
    assert not torch.allclose(score(7, 3), score(7, 4))


def test_generation_never_draws_padding_tokens():
    model = tiny_gpt()
    with torch.no_grad():
        model.lm_head.weight[300:] += 5.0  # padding rows would win every draw
    out = model.generate(torch.zeros(1, 1, dtype=torch.long), 20, temperature=1.0, n_real_vocab=300,
                         generator=torch.Generator().manual_seed(0))
    assert out.max().item() < 300


@pytest.mark.parametrize("args, message", [
    (dict(n_embd=30, n_head=4), "divisible"),
    (dict(block_size=0), "block_size must be positive"),
    (dict(dropout=1.0), "dropout"),
    (dict(activation="swish"), "activation must be one of gelu_new, relu2"),
])
def test_config_validation(args, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**args)


@pytest.mark.parametrize("vocab_rows", [128, 70])  # a multiple of the sampler's block of 64, and not
def test_sampled_label_loss_is_the_cross_entropy_of_its_own_labels(vocab_rows):
    from opengpt.head_loss import sampled_label_cross_entropy

    torch.manual_seed(4)
    hidden = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab_rows, 8, dtype=torch.float64, requires_grad=True)
    loss, labels = sampled_label_cross_entropy(hidden, weight, n_real_vocab=60, generator=torch.Generator().manual_seed(0),
                                               chunk_rows=7)
    loss.backward()
    assert labels.max().item() < 60 and labels.unique().numel() > 10
    h_ref, w_ref = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    expected = F.cross_entropy(h_ref @ w_ref.t(), labels)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hidden.grad, h_ref.grad, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(weight.grad, w_ref.grad, rtol=1e-8, atol=1e-12)


def test_the_plain_reference_loss_path_gives_the_chunked_loss_and_gradients():
    """--chunked_head_loss=False (nanoGPT's full logits + F.cross_entropy) and the chunked head loss
    are the same function: the flag changes speed and memory only."""
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=128, dropout=0.0)
    x = torch.randint(0, 128, (3, 8), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 128, (3, 8), generator=torch.Generator().manual_seed(1))
    y[0, :2] = -1  # ignored positions, as both paths must skip them
    results = []
    for chunked in (True, False):
        torch.manual_seed(0)
        model = GPT(config)
        model.chunked_head_loss = chunked
        _, loss = model(x, y)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_explicit_causal_attention_matches_attention_written_from_the_math():
    from model import explicit_causal_attention

    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 3, 17, 8, dtype=torch.float64) for _ in range(3))
    scale = 0.3
    expected = torch.empty_like(q)
    for t in range(17):  # position t attends to positions 0..t only
        weights = torch.softmax(q[:, :, t:t + 1] @ k[:, :, :t + 1].transpose(-2, -1) * scale, dim=-1)
        expected[:, :, t:t + 1] = weights @ v[:, :, :t + 1]
    torch.testing.assert_close(explicit_causal_attention(q, k, v, scale, 0.0), expected, rtol=1e-12, atol=1e-12)


def test_explicit_attention_replaces_sdpa_only_for_bfloat16_on_a_cpu_at_short_blocks():
    from model import EXPLICIT_ATTENTION_MAX_BLOCK, explicit_attention_pays

    short, long_ = torch.zeros(1, 2, 64, 8), torch.zeros(1, 2, EXPLICIT_ATTENTION_MAX_BLOCK + 1, 8)
    assert not explicit_attention_pays(short)  # float32: SDPA's kernel is as fast
    assert explicit_attention_pays(short.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert explicit_attention_pays(short)
        assert not explicit_attention_pays(long_)
    with torch.autocast("cpu", dtype=torch.float16):
        assert not explicit_attention_pays(short)


def test_model_under_bfloat16_autocast_gives_the_same_loss_with_either_attention(monkeypatch):
    import model as model_module

    torch.manual_seed(5)
    gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=0.0))
    idx, targets = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    losses = {}
    for max_block in (16, 0):  # 0: SDPA everywhere
        monkeypatch.setattr(model_module, "EXPLICIT_ATTENTION_MAX_BLOCK", max_block)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses[max_block] = gpt(idx, targets)[1].item()
    assert abs(losses[16] - losses[0]) < 0.01 * losses[0], losses


@pytest.mark.parametrize("top_k", [None, 4])
def test_sampler_draws_each_token_with_its_softmax_probability(top_k):
    from model import sample_next_token

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, float("-inf"), 3.0])
    temperature, draws = 0.8, 40_000
    kept = logits if top_k is None else logits.masked_fill(logits < logits.topk(top_k).values[-1], float("-inf"))
    expected = torch.softmax(kept.double() / temperature, dim=0)
    tokens = sample_next_token(logits.expand(draws, -1), temperature, top_k, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(tokens.flatten(), minlength=6).double() / draws
    assert torch.all(frequencies[expected == 0] == 0)  # a token of probability 0 is never drawn
    # the standard deviation of each frequency is at most 0.0025 with 40,000 draws
    assert (frequencies - expected).abs().max() < 0.01, (frequencies, expected)


@pytest.mark.parametrize("temperature", [1e-30, 1e-38, 1e-42, 1e-300])
def test_a_temperature_near_zero_draws_as_greedy_does(temperature):
    """x / T overflows float32 for large logits and tiny T (inf - inf is NaN in the softmax); 1e-300 is 0 there."""
    from model import sample_next_token

    logits = torch.randn(64, 500, generator=torch.Generator().manual_seed(0)) * 30
    for top_k in (None, 50):
        tokens = sample_next_token(logits, temperature, top_k, torch.Generator().manual_seed(0))
        assert torch.equal(tokens, logits.argmax(dim=-1, keepdim=True))

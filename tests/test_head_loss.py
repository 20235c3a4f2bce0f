"""head_loss under mixed precision: the gradients it computes inside its forward never pass through
a GradScaler, so they must stay inside float16's range by themselves."""
import pytest
import torch
import torch.nn.functional as F

from opengpt.head_loss import linear_cross_entropy

GPT2_VOCAB, GPT2_WIDTH = 50304, 768
# unit roundoff: half the distance from 1 to the next number (11 and 8 significand bits)
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def relative_error(value, reference):
    return ((value.double() - reference.double()).norm() / reference.double().norm()).item()


@pytest.fixture(scope="module", params=[
    0.02,    # GPT-2 small at initialisation: logits spread ~0.55, a row's exp-sum ~5k
    0.002,   # a flatter head: exp-sum ~0.9 x vocab, so 1/(exp-sum x tokens) ~2e-8 as for 12x1024 tokens at init
])
def gpt2_scale_head(request):
    """(hidden, weight, targets, float32 hidden grad, float32 weight grad, float32 loss) for one
    1024-token sequence of GPT-2 small. What sets the magnitudes the old float16 path lost (a per-row
    scale 1/(exp-sum x tokens)) is the vocabulary, the logits' spread and the token count, not the
    width: the width is cut to 16, with the head's std scaled so the logits spread as at 768,
    because CPU float16 matmuls are slow."""
    width, rows = 16, 1024
    torch.manual_seed(0)
    hidden = torch.randn(rows, width)  # after the final LayerNorm: unit variance
    weight = torch.randn(GPT2_VOCAB, width) * request.param * (GPT2_WIDTH / width) ** 0.5
    targets = torch.randint(0, 50257, (rows,))
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = F.cross_entropy(h_ref @ w_ref.t(), targets)
    loss.backward()
    return hidden, weight, targets, h_ref.grad, w_ref.grad, loss.detach()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_head_gradients_under_autocast_match_float32_at_gpt2_scale(gpt2_scale_head, dtype):
    hidden, weight, targets, ref_hidden_grad, ref_weight_grad, ref_loss = gpt2_scale_head
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        loss = linear_cross_entropy(h, w, targets)
    loss.backward()

    # Rounding the operands, the softmax and each product's result costs ~1 unit roundoff each and
    # they add up at random: a few units in norm. Losing the scale below float16's range cost 12%
    # (head std 0.02) and 68% (0.002) of the weight gradient, hundreds of units.
    tolerance = 4 * UNIT_ROUNDOFF[dtype]
    assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
    errors = dict(weight=relative_error(w.grad, ref_weight_grad), hidden=relative_error(h.grad, ref_hidden_grad),
                  loss=relative_error(loss.detach(), ref_loss))
    assert max(errors.values()) < tolerance, errors


def test_ignored_rows_get_no_gradient_under_float16():
    torch.manual_seed(1)
    hidden = torch.randn(64, 16, requires_grad=True)
    weight = (torch.randn(640, 16) * 0.1).requires_grad_()
    targets = torch.randint(0, 640, (64,))
    targets[::3] = -1
    with torch.autocast("cpu", dtype=torch.float16):
        linear_cross_entropy(hidden, weight, targets).backward()
    h_ref, w_ref = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    F.cross_entropy(h_ref @ w_ref.t(), targets, ignore_index=-1).backward()
    assert torch.all(hidden.grad[::3] == 0)
    errors = dict(weight=relative_error(weight.grad, w_ref.grad), hidden=relative_error(hidden.grad, h_ref.grad))
    assert max(errors.values()) < 4 * UNIT_ROUNDOFF[torch.float16], errors

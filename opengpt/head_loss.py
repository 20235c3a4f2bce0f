"""Cross-entropy of the output head without materialising the full logits.

A small model spends most of its FLOPs and memory traffic in a wide head (GPT-2's 50257 logits per
token, plus their gradient; logs/README.md#the-chunked-head-loss has the numbers). Here the head is
computed chunk by chunk of rows, and because training always backpropagates through the loss, the
gradients of the hidden states and of the head weight are computed in the same pass (as Liger's
fused linear cross-entropy does). Peak extra memory is one chunk of logits instead of all of them.

The same pass can draw the targets from the model's own softmax instead of taking them as input:
that is the loss of SophiaG's Gauss-Newton-Bartlett Hessian estimate, which then costs one head
pass, not a forward to sample labels and another for their loss. It can also do both at once
(linear_cross_entropy_and_sampled): the training loss on the targets and the loss on labels drawn
from the same softmax, whose gradients differ from the training loss's in two columns per row
(softmax - onehot(drawn) = softmax - onehot(target) + onehot(target) - onehot(drawn)), so the second
costs a gather and a scatter, not a second head pass.
"""
import torch

# Logits elements per chunk: 64M, 256 MB in float32 (half in 16 bits) for the logits and as much for
# their softmax. Bigger chunks run the matmuls faster, smaller ones save memory (logs/README.md#the-chunked-head-loss).
CHUNK_ELEMENTS = 2**26
SAMPLING_BLOCK = 64  # vocabulary entries per block in the two-level sampler


def chunk_rows_for(n_rows, vocab_size):
    """Rows per chunk: as few equal chunks as keep each under CHUNK_ELEMENTS logits."""
    n_chunks = -(-n_rows * vocab_size // CHUNK_ELEMENTS)
    return max(1, -(-n_rows // n_chunks))


def _compute_dtype(device_type, fallback):
    """The autocast dtype when autocast is on, else the tensors' own dtype."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return fallback


class _LinearCrossEntropy(torch.autograd.Function):
    """(mean loss, mean loss on drawn labels, drawn labels). With targets and sample_vocab = 0: the
    loss on targets (the other two outputs zero and empty). With targets None: labels drawn from the
    softmax over the first sample_vocab columns, the loss on them first. With both: the loss on targets,
    and the loss on labels drawn from the same softmax over the rows whose target counts."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, sample_vocab, generator, chunk_rows, compute_dtype, ignore_index,
                need_grad):
        n_rows = hidden.shape[0]
        # the loss and the accumulated gradients are at least float32, whatever the matmul dtype
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)
        both = sample_vocab > 0 and targets is not None
        labels = torch.empty(n_rows if sample_vocab else 0, dtype=torch.long, device=hidden.device)
        if targets is None:
            targets = labels
            n_valid = torch.tensor(float(n_rows), dtype=acc_dtype, device=hidden.device)
        else:
            n_valid = (targets != ignore_index).sum().clamp(min=1).to(acc_dtype)
        # One cast of the (small) operands up front; the big per-chunk tensors stay in the matmul dtype.
        hidden_c = hidden.to(compute_dtype)
        weight_c = weight.to(compute_dtype)
        loss_sum = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        sampled_loss_sum = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden, dtype=acc_dtype) if need_grad else None
        grad_weight = torch.zeros_like(weight, dtype=acc_dtype) if need_grad else None
        # with both: what the drawn labels' gradients add to the targets' (onehot(target) - onehot(drawn) terms)
        extra_hidden = torch.empty_like(hidden, dtype=acc_dtype) if need_grad and both else None
        extra_weight = torch.zeros_like(weight, dtype=acc_dtype) if need_grad and both else None
        for start in range(0, n_rows, chunk_rows):
            rows = slice(start, min(start + chunk_rows, n_rows))
            logits = hidden_c[rows] @ weight_c.t()
            if torch.compiler.is_compiling():
                # Compiled, the softmax written out becomes one kernel over the chunk whose row sums give
                # the log-sum-exp too: faster than softmax then two maxima where the exps bound the pass,
                # as on a bf16 CPU (logs/README.md#the-step-against-its-matrix-products-in-bfloat16).
                row_max = logits.amax(dim=1, keepdim=True).to(acc_dtype)
                exps = torch.exp(logits.to(acc_dtype) - row_max)
                row_sum = exps.sum(dim=1, keepdim=True)
                probs = (exps / row_sum).to(compute_dtype)
                lse = row_max + row_sum.log()
            else:
                # Eagerly, one fused row-by-row pass gives the softmax in the matmul dtype, ready for the
                # gradient's matmuls (PyTorch's softmax kernels compute in float32 even for 16-bit tensors):
                # separate log-sum-exp, max, cast and exp passes over rows x vocab cost about twice as much
                # (logs/README.md#the-chunked-head-loss).
                probs = torch.softmax(logits, dim=1)
                # log-sum-exp from the largest probability: p_max = exp(max - lse) is in [1/V, 1], so it is
                # well conditioned in any dtype, and a target whose own probability underflows still gets
                # its exact loss, lse - logit. In 16 bits p_max's rounding moves a row's loss by < 0.002 nats,
                # less than rounding the logits to 16 bits already does. (amax twice: max with indices is
                # slower on a CPU.)
                lse = logits.amax(dim=1, keepdim=True).to(acc_dtype) - probs.amax(dim=1, keepdim=True).to(acc_dtype).log()
            if sample_vocab:
                labels[rows] = _sample_rows(probs.to(acc_dtype), sample_vocab, generator)
            chunk_targets = targets[rows].clamp(min=0).unsqueeze(1)
            chunk_valid = targets[rows] != ignore_index
            target_logit = logits.gather(1, chunk_targets).to(acc_dtype)
            loss_sum += ((lse - target_logit).squeeze(1) * chunk_valid).sum()
            if both:
                chunk_labels = labels[rows].unsqueeze(1)
                sampled_loss_sum += ((lse - logits.gather(1, chunk_labels).to(acc_dtype)).squeeze(1) * chunk_valid).sum()
                if need_grad:
                    valid = chunk_valid.to(acc_dtype).unsqueeze(1)
                    extra_hidden[rows] = (weight_c[chunk_targets.squeeze(1)] - weight_c[chunk_labels.squeeze(1)]).to(acc_dtype) * valid
                    counted = hidden_c[rows].to(acc_dtype) * valid
                    extra_weight.index_add_(0, chunk_targets.squeeze(1), counted).index_add_(0, chunk_labels.squeeze(1), -counted)
            if not need_grad:
                continue
            # d(loss)/d(logits) = (softmax - onehot) * valid / n_valid. softmax - onehot is in [-1, 1],
            # inside every dtype's range (float16 lost most of the head's gradient when a 1/(row sum
            # x n_valid) ~1e-8 scale went on it); the 1/n_valid waits for backward, and the valid mask
            # goes on the small (rows, C) operands.
            target_prob = probs.gather(1, chunk_targets).to(acc_dtype)
            # written through a flat view: scatter_ on a bfloat16 CPU tensor copies all of it
            target_offsets = torch.arange(probs.shape[0], device=probs.device) * probs.shape[1] + chunk_targets.squeeze(1)
            probs.view(-1).index_copy_(0, target_offsets, (target_prob - 1).squeeze(1).to(compute_dtype))
            row_scale = chunk_valid.to(compute_dtype).unsqueeze(1)
            grad_hidden[rows] = (probs @ weight_c) * row_scale
            grad_weight += probs.t() @ (hidden_c[rows] * row_scale)
        if need_grad:
            ctx.save_for_backward(grad_hidden, grad_weight, n_valid, extra_hidden, extra_weight)
        ctx.hidden_dtype, ctx.weight_dtype, ctx.both = hidden.dtype, weight.dtype, both
        sampled_loss = sampled_loss_sum / n_valid
        ctx.mark_non_differentiable(labels, *([] if both else [sampled_loss]))
        return loss_sum / n_valid, sampled_loss, labels

    @staticmethod
    def backward(ctx, grad_loss, grad_sampled_loss, grad_labels):
        grad_hidden, grad_weight, n_valid, extra_hidden, extra_weight = ctx.saved_tensors
        # float32: the GradScaler's factor and the mean's 1/n_valid meet here. The loss on drawn labels
        # has the targets' gradient plus the extra terms (with both; otherwise it is not differentiated).
        scale = grad_loss / n_valid
        if ctx.both:
            sampled_scale = grad_sampled_loss / n_valid
            scale = scale + sampled_scale

        def total(grad, extra, dtype, needed):
            if not needed:
                return None
            return (grad * scale + extra * sampled_scale if ctx.both else grad * scale).to(dtype)
        return (total(grad_hidden, extra_hidden, ctx.hidden_dtype, ctx.needs_input_grad[0]),
                total(grad_weight, extra_weight, ctx.weight_dtype, ctx.needs_input_grad[1]),
                None, None, None, None, None, None, None)


def _apply(hidden, weight, targets, sample_vocab, generator, chunk_rows, ignore_index):
    compute_dtype = _compute_dtype(hidden.device.type, hidden.dtype)
    chunk_rows = chunk_rows or chunk_rows_for(hidden.shape[0], weight.shape[0])
    # Under no_grad (evaluation) skip the gradient work; Function.forward cannot tell by itself.
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, sample_vocab, generator, chunk_rows, compute_dtype,
                                         ignore_index, need_grad)


def linear_cross_entropy(hidden, weight, targets, chunk_rows=None, ignore_index=-1):
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, never holding all logits.

    hidden: (N, C), weight: (V, C), targets: (N,) with `ignore_index` rows left out of the mean.
    Matches F.cross_entropy(hidden @ weight.T, targets, ignore_index=...) in value and gradients.
    """
    loss, _, _ = _apply(hidden, weight, targets, 0, None, chunk_rows, ignore_index)
    return loss


def sampled_label_cross_entropy(hidden, weight, n_real_vocab, generator=None, chunk_rows=None):
    """(mean cross-entropy, labels) where each row's label is drawn from softmax(hidden @ weight.T)
    over the first `n_real_vocab` columns (the padding rows of a padded vocabulary are never drawn),
    in the same pass that computes the loss and its gradients."""
    loss, _, labels = _apply(hidden, weight, None, n_real_vocab, generator, chunk_rows, -1)
    return loss, labels


def linear_cross_entropy_and_sampled(hidden, weight, targets, n_real_vocab, generator=None, chunk_rows=None, ignore_index=-1):
    """(linear_cross_entropy's loss, the mean cross-entropy on labels drawn as sampled_label_cross_entropy
    draws them, labels) in one pass: the drawn labels' loss is over the rows whose target counts, so
    each loss's gradient is that of its own F.cross_entropy (module docstring)."""
    return _apply(hidden, weight, targets, n_real_vocab, generator, chunk_rows, ignore_index)


def _sample_rows(probs, n_real_vocab, generator):
    """One column per row of unnormalised probabilities (rows, V), among the first n_real_vocab.

    Exact inverse-CDF sampling in two levels, because torch.multinomial and
    torch.distributions.Categorical take seconds for 768 x 50257 on a CPU: pick a block of
    SAMPLING_BLOCK columns in proportion to its probability mass, then a column inside it in
    proportion to its probability. Only one pass (the block sums) touches the whole row.
    """
    n_columns = probs.shape[1]
    if n_columns % SAMPLING_BLOCK:  # blocks must be whole: a zero-padded copy of the real columns
        real = probs[:, :n_real_vocab]
        return _two_level_inverse_cdf(torch.nn.functional.pad(real, (0, -n_real_vocab % SAMPLING_BLOCK)), generator)
    if n_real_vocab == n_columns:
        return _two_level_inverse_cdf(probs, generator)
    padding = probs[:, n_real_vocab:].clone()  # the padding columns: zero while sampling, then restored
    probs[:, n_real_vocab:] = 0
    labels = _two_level_inverse_cdf(probs, generator)
    probs[:, n_real_vocab:] = padding
    return labels


def cdf_dtype(device):
    """float64 for the sampler's running sums, except on MPS, which has no float64: float32 there (a
    running sum of ~800 block masses is off by at most ~5e-5 of the row's mass)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _two_level_inverse_cdf(probs, generator):
    """Column index per row of unnormalised probabilities (rows, V), V a multiple of SAMPLING_BLOCK."""
    n_rows = probs.shape[0]
    blocks = probs.view(n_rows, -1, SAMPLING_BLOCK)
    dtype = cdf_dtype(probs.device)
    block_cdf = blocks.sum(dim=2).to(dtype).cumsum_(dim=1)
    u = torch.rand(n_rows, 1, dtype=dtype, device=probs.device, generator=generator) * block_cdf[:, -1:]
    block = torch.searchsorted(block_cdf, u).clamp_(max=block_cdf.shape[1] - 1)
    mass_before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp_(min=0)), torch.zeros_like(u))
    row_index = torch.arange(n_rows, device=probs.device)
    inner_cdf = blocks[row_index, block.squeeze(1)].to(dtype).cumsum_(dim=1)
    # capped at the block's own total, so rounding can never step past its last non-zero column
    remainder = torch.minimum(u - mass_before, inner_cdf[:, -1:])
    inner = torch.searchsorted(inner_cdf, remainder)
    return (block * SAMPLING_BLOCK + inner).squeeze(1)


@torch.no_grad()
def sample_labels(hidden, weight, n_real_vocab, generator=None, chunk_rows=None):
    """Only the labels of sampled_label_cross_entropy (for tests and benchmarks)."""
    _, labels = sampled_label_cross_entropy(hidden, weight, n_real_vocab, generator, chunk_rows)
    return labels

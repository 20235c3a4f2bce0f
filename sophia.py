"""SophiaG: Second-order Clipped Stochastic Optimization, Gauss-Newton-Bartlett variant.

Liu, Li, Hall, Liang, Ma, "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
Pre-training" (arXiv 2305.14342), Algorithm 3. Per parameter, every step:

    p <- p * (1 - lr * weight_decay)                   decoupled weight decay
    m <- beta1 * m + (1 - beta1) * g                   momentum
    p <- p - lr * sign(m) * min(|m| / (rho * bs * h + eps), 1)

and, when the training loop calls update_hessian() after a backward pass on labels sampled from
the model (every k steps), h <- beta2 * h + (1 - beta2) * g_hat * g_hat.

`bs` is the number of tokens in one optimizer step, as in the authors' code, and rho is tuned with
that convention. The loss is a mean over tokens, so g_hat^2 is the GNB estimate divided by the
Hessian batch's token count; the training loop estimates it, as the authors do, over the whole
optimizer batch (all gradient_accumulation_steps micro-batches), so rho * bs * h is rho times the
paper's estimate. With fewer Hessian micro-batches (--hess_accumulation_steps) h is noisier and
the effective rho grows by gradient_accumulation_steps / hess_accumulation_steps.

Before the first update_hessian() h is zero and every coordinate is clipped, so the step is
lr * sign(m): sign momentum. A loop that never calls update_hessian() (the project this one is
modelled on) therefore runs sign momentum, not Sophia.

All parameters of a group are updated with torch._foreach_* multi-tensor ops, or with
compiled=True by sophia_update_ compiled into one pass per parameter (as fast as AdamW's fused
step); nothing in step() waits for the device: the statistics are kept as tensors and read only when asked.

Which rho? A coordinate is not clipped (it "wins") when |m| / (bs * h) < rho (up to eps). So the
quantiles of r = |m| / (bs * h) over all coordinates, which statistics() reports, say what win_rate
every rho would give: with rho at the 10% quantile, 10% of the coordinates would win.
"""
import functools

import torch

RATIO_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
# r is counted in bins of 1/100 of a decade from 1e-12 to 1e12 (exact integer counts, no sort of
# all coordinates), so a reported quantile is at most 2.3% above the true one. r beyond the range
# counts in the end bins: 1e12 means no rho below that (where h is zero: before any estimate).
LOG10_RATIO_RANGE = (-12.0, 12.0)
LOG10_RATIO_BINS = 2400


def loss_of(closure):
    """What an optimizer's step(closure) returns: the closure's loss, computed with gradients on
    (opengpt/muon.py's optimizers use it too)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class SophiaG(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=1e-1, eps=1e-15, compiled=False):
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta} (must be in [0, 1))")
        if not rho >= 0.0:
            raise ValueError(f"Invalid rho parameter: {rho}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not eps > 0.0:
            raise ValueError(f"Invalid eps value: {eps}")
        defaults = dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, eps=eps)
        super().__init__(params, defaults)
        self.track_stats = False
        self._stats = None
        self.compiled = compiled  # the step as one torch.compile'd pass per parameter (needs a C++ compiler on a CPU)

    def _state_for(self, p):
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def update_hessian(self):
        """h <- beta2 * h + (1 - beta2) * g * g, with g the gradients now in .grad (those of the
        loss on labels sampled from the model)."""
        for group in self.param_groups:
            beta2 = group["betas"][1]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            hessians = [self._state_for(p)["hessian"] for p in params]
            grads = [p.grad for p in params]
            torch._foreach_mul_(hessians, beta2)
            torch._foreach_addcmul_(hessians, grads, grads, value=1 - beta2)

    @torch.no_grad()
    def step(self, closure=None, bs=5120):
        loss = loss_of(closure)
        stats = [] if self.track_stats else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("SophiaG does not support sparse gradients")
            states = [self._state_for(p) for p in params]
            grads = [p.grad for p in params]
            exp_avgs = [s["exp_avg"] for s in states]
            hessians = [s["hessian"] for s in states]
            torch._foreach_add_([s["step"] for s in states], 1.0)
            beta1 = group["betas"][0]
            lr, rho, wd, eps = group["lr"], group["rho"], group["weight_decay"], group["eps"]

            if self.compiled:
                lr_tensor = torch.tensor(lr, device=params[0].device)  # a tensor: a new lr does not recompile
                _compiled_update()(params, grads, exp_avgs, hessians, lr_tensor, beta1, rho * bs, wd, eps)
            else:
                if wd != 0:
                    torch._foreach_mul_(params, 1 - lr * wd)
                torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)  # m <- beta1*m + (1-beta1)*g
                # sign(m) * min(|m| / d, 1) is clamp(m / d, -1, 1), as d = rho * bs * h + eps > 0: three passes fewer
                updates = torch._foreach_div(exp_avgs, _denominators(hessians, rho * bs, eps))
                torch._foreach_clamp_min_(updates, -1.0)
                torch._foreach_clamp_max_(updates, 1.0)
                torch._foreach_add_(params, updates, alpha=-lr)
            if stats is not None:  # from m after the step and h, as the step used them
                stats.append(_step_statistics(_clipped_ratios(exp_avgs, hessians, rho * bs, eps), exp_avgs, hessians, bs))
        if stats:
            self._stats = stats
        return loss

    def statistics(self):
        """Of the last step taken with track_stats on: win_rate (fraction of coordinates not
        clipped; the authors advise keeping it between 0.1 and 0.5), clip_rate (1 - win_rate),
        hessian_norm (L2 norm of the Hessian EMA over all parameters), and ratio_qNN for each of
        RATIO_QUANTILES: the NN% quantile of |m| / (bs * h), the rho at which win_rate would be
        NN% (see the module's docstring). Reads the device."""
        if not self._stats:
            return {}
        not_clipped = sum(s[0] for s in self._stats).item()
        total = sum(s[1] for s in self._stats)
        hessian_norm = sum(s[2] for s in self._stats).sqrt().item()
        win_rate = not_clipped / total
        quantiles = ratio_quantiles(sum(s[3] for s in self._stats))
        return {"win_rate": win_rate, "clip_rate": 1.0 - win_rate, "hessian_norm": hessian_norm,
                **{f"ratio_q{round(q * 100):02d}": value for q, value in zip(RATIO_QUANTILES, quantiles)}}


def sophia_update_(params, grads, exp_avgs, hessians, lr, beta1, rho_bs, weight_decay, eps):
    """The step of the module's docstring on a group's tensors, in place, written tensor by tensor as
    the maths: what SophiaG(compiled=True) compiles into one pass over each parameter, where the
    foreach path makes eight (logs/README.md#sophiags-step-compiled)."""
    for p, g, m, h in zip(params, grads, exp_avgs, hessians):
        p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        p.sub_(lr * (m / (rho_bs * h + eps)).clamp(-1, 1))  # = lr * sign(m) * min(|m| / (rho * bs * h + eps), 1)


@functools.cache
def _compiled_update():
    """sophia_update_ compiled, made on first use: importing sophia.py compiles nothing."""
    return torch.compile(sophia_update_, dynamic=False)


def _denominators(hessians, rho_bs, eps):
    denominators = torch._foreach_mul(hessians, rho_bs)
    torch._foreach_add_(denominators, eps)
    return denominators


def _clipped_ratios(exp_avgs, hessians, rho_bs, eps):
    """min(|m| / (rho * bs * h + eps), 1) per coordinate, what the statistics count."""
    ratios = torch._foreach_abs(exp_avgs)
    torch._foreach_div_(ratios, _denominators(hessians, rho_bs, eps))
    torch._foreach_clamp_max_(ratios, 1.0)
    return ratios


def _step_statistics(ratios, exp_avgs, hessians, bs):
    """(count of unclipped coordinates, count of coordinates, squared Hessian norm, histogram of
    log10 |m| / (bs * h) in LOG10_RATIO_BINS bins) as tensors, without reading the device."""
    not_clipped = sum((r < 1.0).sum() for r in ratios)
    total = sum(r.numel() for r in ratios)
    hessian_sq = sum(torch.linalg.vector_norm(h, dtype=torch.float32) ** 2 for h in hessians)
    low, high = LOG10_RATIO_RANGE
    bin_width = (high - low) / LOG10_RATIO_BINS
    counts = 0
    for m, h in zip(exp_avgs, hessians):
        log_ratio = torch.log10(m.abs().float()) - torch.log10(h.float() * bs)
        # h = 0 < |m|: +inf, no rho wins it (the last bin); m = 0: -inf or nan, every rho does (the first)
        log_ratio = torch.nan_to_num(log_ratio, nan=low, posinf=high, neginf=low)
        bins = ((log_ratio - low) / bin_width).floor_().clamp_(0, LOG10_RATIO_BINS - 1).long()
        counts = counts + torch.bincount(bins.flatten(), minlength=LOG10_RATIO_BINS)
    return not_clipped, total, hessian_sq, counts


def ratio_quantiles(counts):
    """For each of RATIO_QUANTILES, the upper edge of the first bin of the histogram `counts` at
    which the cumulative count reaches that fraction: a value at most one bin above the quantile."""
    low, high = LOG10_RATIO_RANGE
    counts = counts.cpu()  # a few hundred counts, summed in float64, which MPS does not have
    cumulative = counts.cumsum(0).double() / counts.sum()
    first_bins = torch.searchsorted(cumulative, torch.tensor(RATIO_QUANTILES, dtype=torch.float64))
    first_bins = first_bins.clamp(max=LOG10_RATIO_BINS - 1)
    return [10 ** (low + (i + 1) * (high - low) / LOG10_RATIO_BINS) for i in first_bins.tolist()]

"""SophiaG against the paper's formulas, its state and statistics, GNB label sampling, and the
Hessian estimate inside train.py's loop (float32 and, with a GradScaler, float16)."""
import io
import random
import signal
import sys

import numpy as np
import pytest
import torch

from opengpt import hardware
from opengpt import head_loss
import train
from conftest import TINY_MODEL_ARGS, read_events
from opengpt.head_loss import sample_labels
from sophia import SophiaG

# Two groups that differ in every hyperparameter, and shapes from a scalar to 3-D.
GROUPS = [dict(lr=0.05, betas=(0.9, 0.95), rho=0.04, weight_decay=0.1),
          dict(lr=0.02, betas=(0.8, 0.99), rho=0.5, weight_decay=0.0)]
GROUP_SHAPES = [[(5,), (4, 3)], [(2, 3, 2), ()]]
TOKENS_PER_STEP = 8  # SophiaG's bs
# Hessian gradients this large put rho * bs * h near |m|, so some coordinates are clipped and some not.
HESSIAN_GRAD_SCALE = 4.0


# --- reference: written from the paper, not from sophia.py --------------------------------------

def reference_step(p, m, h, g, lr, beta1, rho, weight_decay, bs, eps=1e-15):
    """One SophiaG step for one tensor, from the formulas of Liu et al. 2023 (arXiv 2305.14342,
    Algorithm 3) with decoupled weight decay. Returns (p, m, ratio); ratio < 1 means not clipped."""
    p = p * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * g
    ratio = torch.minimum(m.abs() / (rho * bs * h + eps), torch.ones_like(m))
    return p - lr * torch.sign(m) * ratio, m, ratio


def reference_hessian_update(h, g_hat, beta2):
    """The Hessian EMA of Algorithm 3: h <- beta2 * h + (1 - beta2) * g_hat * g_hat."""
    return beta2 * h + (1 - beta2) * g_hat * g_hat


class ReferenceSophia:
    """A plain per-tensor loop in float64 over the same groups as the optimizer under test."""

    def __init__(self, param_groups):
        self.groups = [dict(group, params=[p.detach().double() for p in group["params"]]) for group in param_groups]
        self.exp_avgs = [[torch.zeros_like(p) for p in g["params"]] for g in self.groups]
        self.hessians = [[torch.zeros_like(p) for p in g["params"]] for g in self.groups]
        self.ratios = None  # of the last step

    def step(self, grads, bs):
        self.ratios = []
        for gi, group in enumerate(self.groups):
            for i, g in enumerate(grads[gi]):
                group["params"][i], self.exp_avgs[gi][i], ratio = reference_step(
                    group["params"][i], self.exp_avgs[gi][i], self.hessians[gi][i], g.double(), group["lr"],
                    group["betas"][0], group["rho"], group["weight_decay"], bs)
                self.ratios.append(ratio)

    def update_hessian(self, grads):
        for gi, group in enumerate(self.groups):
            for i, g in enumerate(grads[gi]):
                self.hessians[gi][i] = reference_hessian_update(self.hessians[gi][i], g.double(), group["betas"][1])


# --- helpers -------------------------------------------------------------------------------------

def make_param_groups(seed=0):
    """GROUPS with float32 parameters of GROUP_SHAPES, |p| in [1, 2] so that relative errors mean
    something (8 steps move a parameter by at most 0.4)."""
    generator = torch.Generator().manual_seed(seed)
    groups = []
    for hyper, shapes in zip(GROUPS, GROUP_SHAPES):
        params = []
        for shape in shapes:
            magnitude = 1 + torch.rand(shape, generator=generator)
            sign = torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0)
            params.append(torch.nn.Parameter(magnitude * sign))
        groups.append(dict(hyper, params=params))
    return groups


def random_grads(param_groups, generator, scale=1.0):
    """One float32 gradient per parameter, grouped like param_groups."""
    return [[torch.randn(p.shape, generator=generator) * scale for p in g["params"]] for g in param_groups]


def set_grads(param_groups, grads):
    for group, group_grads in zip(param_groups, grads):
        for p, g in zip(group["params"], group_grads):
            p.grad = g.clone()


def run_schedule(optimizer, param_groups, generator, n_steps, hess_interval, reference=None):
    """n_steps steps on fresh random gradients, with a Hessian update on fresh random "sampled-label"
    gradients after every hess_interval-th step (as train.py does). The reference, if given,
    sees the same gradients. Returns how many (unclipped, clipped) coordinates the reference saw."""
    unclipped = clipped = 0
    for step in range(n_steps):
        grads = random_grads(param_groups, generator)
        set_grads(param_groups, grads)
        optimizer.step(bs=TOKENS_PER_STEP)
        if reference is not None:
            reference.step(grads, TOKENS_PER_STEP)
            unclipped += sum(int((r < 1).sum()) for r in reference.ratios)
            clipped += sum(int((r >= 1).sum()) for r in reference.ratios)
        if hess_interval and step % hess_interval == hess_interval - 1:
            hessian_grads = random_grads(param_groups, generator, HESSIAN_GRAD_SCALE)
            set_grads(param_groups, hessian_grads)
            optimizer.update_hessian()
            if reference is not None:
                reference.update_hessian(hessian_grads)
    return unclipped, clipped


def max_relative_error(actual, expected):
    """max |a - b| / |b|; the parameters compared here stay away from zero (see make_param_groups)."""
    return ((actual.double() - expected).abs() / expected.abs().clamp(min=1e-12)).max().item()


def max_error_relative_to_scale(actual, expected):
    """max |a - b| / max |b|: for state such as momentum, whose coordinates may cross zero."""
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp(min=1e-12)).item()


def all_params(param_groups):
    return [p for g in param_groups for p in g["params"]]


# --- the optimizer ------------------------------------------------------------------------------

@pytest.mark.parametrize("compiled", [False, True], ids=["foreach", "compiled"])
def test_sophiag_matches_the_papers_update_in_float64(compiled):
    param_groups = make_param_groups()
    optimizer = SophiaG(param_groups, compiled=compiled)
    reference = ReferenceSophia(param_groups)
    unclipped, clipped = run_schedule(optimizer, param_groups, torch.Generator().manual_seed(1), n_steps=8,
                                      hess_interval=3, reference=reference)
    # both branches of min(., 1) were taken, or this would only test sign momentum
    assert unclipped >= 10 and clipped >= 10, (unclipped, clipped)

    actual_params = all_params(optimizer.param_groups)
    expected_params = [p for g in reference.groups for p in g["params"]]
    assert max(max_relative_error(a, b) for a, b in zip(actual_params, expected_params)) < 1e-6
    expected_m = [m for group in reference.exp_avgs for m in group]
    expected_h = [h for group in reference.hessians for h in group]
    for p, m, h in zip(actual_params, expected_m, expected_h):
        assert max_error_relative_to_scale(optimizer.state[p]["exp_avg"], m) < 1e-6
        assert max_error_relative_to_scale(optimizer.state[p]["hessian"], h) < 1e-6
        assert optimizer.state[p]["step"].item() == 8


def test_without_a_hessian_estimate_the_step_is_sign_momentum():
    """hess_interval=0: h stays zero, every coordinate is clipped, and the step is lr * sign(m)
    whatever the size of the gradient."""
    lr, weight_decay, beta1 = 0.01, 0.1, 0.9
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0, -4.0]))
    optimizer = SophiaG([p], lr=lr, betas=(beta1, 0.99), weight_decay=weight_decay)
    m = torch.zeros(4)
    # gradients from 1e-8 to 1e3, and a second step that flips the sign of m in two coordinates
    for grad in (torch.tensor([1e-8, -1e-3, 5.0, -1e3]), torch.tensor([-1e-6, -1.0, -1e3, 1e-2])):
        expected = p.detach() * (1 - lr * weight_decay) - lr * torch.sign(beta1 * m + (1 - beta1) * grad)
        m = beta1 * m + (1 - beta1) * grad
        p.grad = grad
        optimizer.step(bs=5120)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-7, atol=0)
    assert torch.equal(torch.sign(m), torch.tensor([-1.0, -1.0, -1.0, -1.0]))  # the flip happened
    assert torch.count_nonzero(optimizer.state[p]["hessian"]) == 0


def test_state_dict_round_trip_continues_bit_identically():
    param_groups = make_param_groups()
    optimizer = SophiaG(param_groups)
    generator = torch.Generator().manual_seed(2)
    run_schedule(optimizer, param_groups, generator, n_steps=4, hess_interval=2)

    buffer = io.BytesIO()  # through bytes, as a checkpoint does, so nothing is shared by reference
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    copied_groups = [dict(params=[torch.nn.Parameter(p.detach().clone()) for p in g["params"]]) for g in param_groups]
    restored = SophiaG(copied_groups)  # default hyperparameters: the state dict must bring the groups' own
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert any(torch.count_nonzero(s["hessian"]) for s in restored.state.values())

    generator_state = generator.get_state()
    run_schedule(optimizer, param_groups, generator, n_steps=5, hess_interval=2)
    generator.set_state(generator_state)
    run_schedule(restored, restored.param_groups, generator, n_steps=5, hess_interval=2)
    for a, b in zip(all_params(optimizer.param_groups), all_params(restored.param_groups)):
        assert torch.equal(a, b)
        for key in ("exp_avg", "hessian", "step"):
            assert torch.equal(optimizer.state[a][key], restored.state[b][key])


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1e-3), "learning rate"),
    (dict(lr=float("nan")), "learning rate"),
    (dict(betas=(-0.1, 0.99)), "beta"),
    (dict(betas=(0.9, 1.0)), "beta"),
    (dict(rho=-0.01), "rho"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(eps=0.0), "eps"),
])
def test_invalid_hyperparameters_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SophiaG([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_boundary_hyperparameters_are_accepted():
    SophiaG([torch.nn.Parameter(torch.zeros(2))], lr=0.0, betas=(0.0, 0.0), rho=0.0, weight_decay=0.0)


@pytest.mark.parametrize("compiled", [False, True], ids=["foreach", "compiled"])
def test_statistics_report_win_rate_and_hessian_norm_of_the_last_tracked_step(compiled):
    param_groups = make_param_groups()
    optimizer = SophiaG(param_groups, compiled=compiled)
    optimizer.track_stats = True
    reference = ReferenceSophia(param_groups)
    run_schedule(optimizer, param_groups, torch.Generator().manual_seed(3), n_steps=7, hess_interval=3,
                 reference=reference)  # the last step follows two Hessian updates

    ratios = torch.cat([r.flatten() for r in reference.ratios])
    expected_win_rate = (ratios < 1).double().mean().item()
    assert 0 < expected_win_rate < 1
    hessians = torch.cat([h.flatten() for group in reference.hessians for h in group])
    stats = optimizer.statistics()
    assert stats["win_rate"] == pytest.approx(expected_win_rate, abs=1e-12)
    assert stats["clip_rate"] == pytest.approx(1 - expected_win_rate, abs=1e-12)
    assert stats["hessian_norm"] == pytest.approx(torch.linalg.vector_norm(hessians).item(), rel=1e-6)

    # untracked steps leave the statistics of the last tracked one
    optimizer.track_stats = False
    run_schedule(optimizer, param_groups, torch.Generator().manual_seed(4), n_steps=3, hess_interval=1)
    assert optimizer.statistics() == stats


def test_untracked_steps_record_no_statistics():
    param_groups = make_param_groups()
    optimizer = SophiaG(param_groups)
    run_schedule(optimizer, param_groups, torch.Generator().manual_seed(5), n_steps=3, hess_interval=1)
    assert optimizer.statistics() == {}


# --- labels for the Gauss-Newton-Bartlett estimate --------------------------------------------------

def test_mps_samples_labels_without_float64():
    assert head_loss.cdf_dtype(torch.device("mps")) == torch.float32  # MPS has no float64
    assert head_loss.cdf_dtype(torch.device("cpu")) == head_loss.cdf_dtype(torch.device("cuda")) == torch.float64


def test_sampled_labels_never_reach_the_padding_columns():
    n_real_vocab, padded_vocab, n_embd = 10, 16, 8
    generator = torch.Generator().manual_seed(6)
    hidden = torch.randn(50, n_embd, generator=generator)
    weight = torch.randn(padded_vocab, n_embd, generator=generator)
    weight[n_real_vocab:] = 100 * hidden.mean(0)  # the padding rows would win every draw if allowed
    # 50 rows in chunks of 7: several chunks, the last one short
    labels = sample_labels(hidden, weight, n_real_vocab, generator=generator, chunk_rows=7)
    assert labels.shape == (50,) and labels.dtype == torch.long
    assert int(labels.min()) >= 0 and int(labels.max()) < n_real_vocab
    # the same rows over the whole padded vocabulary do draw padding: the test above can fail
    assert int(sample_labels(hidden, weight, padded_vocab, generator=generator).max()) >= n_real_vocab


@pytest.mark.parametrize("cdf_dtype", [torch.float64, torch.float32])  # float32: what MPS gets, forced here
# one block of the sampler, then four (with softer logits, so that no label's expected count is a
# handful, where the normal approximation of the bound below fails)
@pytest.mark.parametrize("n_real_vocab, padded_vocab, weight_std", [(12, 16, 1.0), (200, 256, 0.3)])
def test_sampled_label_frequencies_follow_the_models_softmax(monkeypatch, cdf_dtype, n_real_vocab, padded_vocab,
                                                             weight_std):
    """Two hidden vectors on alternating rows, so that a chunk that mixed up rows would show.
    Each label's count is within 5 binomial standard errors of n * softmax probability."""
    monkeypatch.setattr(head_loss, "cdf_dtype", lambda device: cdf_dtype)
    n_embd, n_per_vector = 6, 20000
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(padded_vocab, n_embd, generator=generator) * weight_std
    vectors = torch.randn(2, n_embd, generator=generator)
    hidden = vectors.repeat(n_per_vector, 1)  # rows 0, 2, 4, ... are vectors[0]
    labels = sample_labels(hidden, weight, n_real_vocab, generator=generator, chunk_rows=3001)
    for which in range(2):
        probs = torch.softmax(vectors[which].double() @ weight[:n_real_vocab].double().T, dim=0)
        assert probs.max() > 2 * probs.min()  # a non-uniform target, or frequencies prove little
        counts = torch.bincount(labels[which::2], minlength=n_real_vocab).double()
        assert counts.shape[0] == n_real_vocab
        standard_error = (n_per_vector * probs * (1 - probs)).sqrt()
        assert ((counts - n_per_vector * probs).abs() <= 5 * standard_error).all(), (counts, n_per_vector * probs)


# --- the Hessian in the training loop -------------------------------------------------------------

def train_sophiag(data_dir, out_dir, *overrides):
    """Run train.py's main() in this process (a fresh interpreter spends seconds importing torch)
    on the tiny model, and return its checkpoint. The global RNGs and signal handlers that train.py
    sets are put back afterwards."""
    argv = ["train.py", f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TINY_MODEL_ARGS,
            "--max_iters=4", "--eval_interval=4", "--eval_iters=1", "--warmup_iters=1", "--lr_decay_iters=4",
            "--optimizer=sophiag", *overrides]
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    python_rng, numpy_rng = random.getstate(), np.random.get_state()
    with pytest.MonkeyPatch.context() as patch, torch.random.fork_rng():
        patch.setattr(sys, "argv", argv)
        # MFU's float16 matmul benchmark takes seconds on a CPU; MFU is not what is tested here
        patch.setattr(hardware, "peak_flops", lambda device, dtype: (1e12, "fixed for tests"))
        try:
            train.main()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            random.setstate(python_rng)
            np.random.set_state(numpy_rng)
    return torch.load(out_dir / "ckpt.pt", weights_only=True)


def hessians_of(checkpoint):
    return [s["hessian"] for s in checkpoint["optimizer"]["state"].values()]


@pytest.fixture(scope="module")
def float32_checkpoint(tiny_data, tmp_path_factory):
    """4 iterations with the Hessian estimated after iterations 1 and 3."""
    return train_sophiag(tiny_data, tmp_path_factory.mktemp("sophiag_fp32"), "--hess_interval=2")


def test_training_loop_estimates_the_hessian_of_every_parameter(float32_checkpoint):
    checkpoint = float32_checkpoint
    hessians = hessians_of(checkpoint)
    n_params = sum(len(g["params"]) for g in checkpoint["optimizer"]["param_groups"])
    assert len(hessians) == n_params
    for h in hessians:
        assert torch.isfinite(h).all() and (h >= 0).all()  # an EMA of squares
        assert torch.count_nonzero(h) > 0


def test_hess_interval_zero_never_estimates_the_hessian(tiny_data, tmp_path):
    checkpoint = train_sophiag(tiny_data, tmp_path, "--hess_interval=0", "--max_iters=2", "--eval_interval=2")
    states = list(checkpoint["optimizer"]["state"].values())
    assert states and all(s["step"].item() == 2 for s in states)  # the optimizer did step
    assert all(torch.count_nonzero(s["exp_avg"]) > 0 for s in states)
    assert all(torch.count_nonzero(s["hessian"]) == 0 for s in states)


def cpu_float16_autocast_works():
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            product = torch.ones(2, 2) @ torch.ones(2, 2)
        return product.dtype == torch.float16 and torch.amp.GradScaler("cpu").is_enabled()
    except (RuntimeError, TypeError, AttributeError):
        return False


@pytest.mark.skipif(not cpu_float16_autocast_works(), reason="this torch has no CPU float16 autocast with GradScaler")
def test_float16_hessian_estimate_undoes_the_loss_scale(float32_checkpoint, tiny_data, tmp_path):
    """The same run in float16 with a GradScaler: the Hessian EMA must match float32's. Had the
    scale not been divided out of the gradients, it would be scale**2 = 2**32 times too large."""
    checkpoint = train_sophiag(tiny_data, tmp_path, "--hess_interval=2", "--dtype=float16")
    assert checkpoint["scaler"]["scale"] > 1  # the loss really was scaled
    for h16, h32 in zip(hessians_of(checkpoint), hessians_of(float32_checkpoint)):
        # Float16 logits shift the sampler's cumulative distribution by ~1e-3, enough to draw other
        # labels from a near-uniform untrained model, so the two estimates are different random
        # draws of the same quantity: they agree within a factor 2, an unscaled one is off by 2**32.
        assert 0.5 < h16.norm().item() / h32.norm().item() < 2.0
        assert torch.count_nonzero(h16) > 0


@pytest.mark.skipif(not cpu_float16_autocast_works(), reason="this torch has no CPU float16 autocast with GradScaler")
def test_float16_hessian_pass_with_overflowing_gradients_is_skipped(tiny_data, tmp_path, monkeypatch):
    """An overflow in the Hessian pass (what a GradScaler's scale can cause in float16) leaves the
    Hessian EMA as it was instead of filling it with inf; the training steps go on."""
    import model as model_module

    real_forward = model_module.GPT.forward

    def forward_overflowing_on_sampled_labels(self, idx, targets=None, sample_labels_from_vocab=0, **kwargs):
        logits, loss = real_forward(self, idx, targets, sample_labels_from_vocab, **kwargs)
        return logits, loss * float("inf") if sample_labels_from_vocab else loss

    monkeypatch.setattr(model_module.GPT, "forward", forward_overflowing_on_sampled_labels)
    checkpoint = train_sophiag(tiny_data, tmp_path, "--hess_interval=2", "--dtype=float16")
    assert all(torch.count_nonzero(h) == 0 for h in hessians_of(checkpoint))
    assert all(s["step"].item() == 4 for s in checkpoint["optimizer"]["state"].values())


# --- which rho gives which win_rate: quantiles of |m| / (bs * h) -------------------------------------

def reference_ratio_quantiles(reference, bs, quantiles):
    """From the float64 reference's state: r = |m| / (bs * h) over all coordinates, and for each q
    the smallest r with at least a fraction q of the coordinates at or below it (inverted CDF)."""
    m = torch.cat([x.flatten() for group in reference.exp_avgs for x in group])
    h = torch.cat([x.flatten() for group in reference.hessians for x in group])
    ratios = (m.abs() / (bs * h)).sort().values
    return [ratios[int(np.ceil(q * ratios.numel())) - 1].item() for q in quantiles]


def test_ratio_quantiles_tell_which_rho_gives_which_win_rate():
    """statistics() reports, for each q, a value within one bin (1/100 decade) above the q-quantile
    of |m| / (bs * h): setting rho there would give a win_rate of about q."""
    import sophia

    param_groups = make_param_groups()
    optimizer = SophiaG(param_groups)
    optimizer.track_stats = True
    reference = ReferenceSophia(param_groups)
    run_schedule(optimizer, param_groups, torch.Generator().manual_seed(8), n_steps=7, hess_interval=3, reference=reference)
    stats = optimizer.statistics()
    expected = reference_ratio_quantiles(reference, TOKENS_PER_STEP, sophia.RATIO_QUANTILES)
    assert len(set(expected)) == len(expected)  # distinct quantiles, or the test would prove little
    one_bin = 10 ** ((sophia.LOG10_RATIO_RANGE[1] - sophia.LOG10_RATIO_RANGE[0]) / sophia.LOG10_RATIO_BINS)
    for q, value in zip(sophia.RATIO_QUANTILES, expected):
        reported = stats[f"ratio_q{round(q * 100):02d}"]
        assert value * (1 - 1e-5) <= reported <= value * one_bin * (1 + 1e-5), (q, reported, value)


def test_before_any_hessian_estimate_no_rho_wins():
    """h = 0: every quantile sits at the top of the range (no rho below 1e12 would unclip anything)."""
    import sophia

    param_groups = make_param_groups()
    optimizer = SophiaG(param_groups)
    optimizer.track_stats = True
    run_schedule(optimizer, param_groups, torch.Generator().manual_seed(9), n_steps=2, hess_interval=0)
    stats = optimizer.statistics()
    assert stats["win_rate"] == 0.0
    for q in sophia.RATIO_QUANTILES:
        assert stats[f"ratio_q{round(q * 100):02d}"] == pytest.approx(10 ** sophia.LOG10_RATIO_RANGE[1])


# --- the Hessian pass as the authors run it ----------------------------------------------------------

class HessianPassRecorder:
    """Records, through monkeypatches, each sampled-label forward of the training loop (its input,
    the weights at that moment, the labels drawn) and the gradients update_hessian() receives."""

    def __init__(self, monkeypatch):
        import model as model_module
        import sophia

        self.forwards, self.updates, self.names = [], [], {}
        real_forward, real_sampled_loss = model_module.GPT.forward, model_module.sampled_label_cross_entropy
        real_both = model_module.linear_cross_entropy_and_sampled
        real_update = sophia.SophiaG.update_hessian

        def forward(gpt, idx, targets=None, sample_labels_from_vocab=0, label_generator=None):
            if sample_labels_from_vocab:
                self.names = {id(p): name for name, p in gpt.named_parameters()}
                self.forwards.append(dict(idx=idx.clone(), state={k: v.detach().clone() for k, v in gpt.state_dict().items()},
                                          config=gpt.config))
            return real_forward(gpt, idx, targets, sample_labels_from_vocab, label_generator)

        def sampled_loss(hidden, weight, n_real_vocab, generator=None, chunk_rows=None):
            loss, labels = real_sampled_loss(hidden, weight, n_real_vocab, generator, chunk_rows)
            self.forwards[-1]["labels"] = labels.clone()
            return loss, labels

        def both(hidden, weight, targets, n_real_vocab, generator=None, chunk_rows=None, ignore_index=-1):
            loss, sampled, labels = real_both(hidden, weight, targets, n_real_vocab, generator, chunk_rows, ignore_index)
            self.forwards[-1]["labels"] = labels.clone()
            return loss, sampled, labels

        def update_hessian(optimizer):
            self.updates.append({self.names[id(p)]: p.grad.clone() for g in optimizer.param_groups for p in g["params"]
                                 if p.grad is not None})
            return real_update(optimizer)

        monkeypatch.setattr(model_module.GPT, "forward", forward)
        monkeypatch.setattr(model_module, "sampled_label_cross_entropy", sampled_loss)
        monkeypatch.setattr(model_module, "linear_cross_entropy_and_sampled", both)
        monkeypatch.setattr(sophia.SophiaG, "update_hessian", update_hessian)


def reference_hessian_gradient(forwards, grad_clip):
    """From the math, in float64: the gradient of the mean over the pass's micro-batches of the
    cross-entropy (full logits, F.cross_entropy) on the recorded labels, its norm, and the gradient
    clipped to grad_clip as torch.nn.utils.clip_grad_norm_ does."""
    from model import GPT

    model = GPT(forwards[0]["config"]).double()
    model.load_state_dict({k: v.double() for k, v in forwards[0]["state"].items()})
    loss = 0
    for forward in forwards:
        logits = model.full_logits(forward["idx"])
        loss = loss + torch.nn.functional.cross_entropy(logits.flatten(0, 1), forward["labels"]) / len(forwards)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads.values()))
    scale = min(1.0, grad_clip / (norm.item() + 1e-6)) if grad_clip > 0 else 1.0
    return {name: g * scale for name, g in grads.items()}, norm.item()


@pytest.mark.parametrize("hess_accumulation, grad_clip, hessian_batch", [(0, 0.05, "fresh"), (1, 0.0, "fresh"), (0, 0.05, "step")])
def test_hessian_pass_uses_the_whole_batch_and_clips_its_gradient(tiny_data, tmp_path, monkeypatch, hess_accumulation, grad_clip,
                                                                 hessian_batch):
    """With 3 micro-batches per step, the default Hessian pass runs on all 3 (0 = the training
    accumulation), and update_hessian() gets the gradient of their mean sampled-label loss clipped
    at grad_clip, as in the authors' train_sophiag.py; --hess_accumulation_steps=1 takes one. The
    gradient's norm before clipping is logged. grad_clip=0.05 is below the norm, so clipping bites.
    --hessian_batch=step: the same estimate from the step's own forward (its windows, the weights
    before its update), against the same float64 reference."""
    recorder = HessianPassRecorder(monkeypatch)
    train_sophiag(tiny_data, tmp_path, "--gradient_accumulation_steps=3", f"--hess_accumulation_steps={hess_accumulation}",
                  f"--grad_clip={grad_clip}", "--hess_interval=2", "--max_iters=2", "--eval_interval=2", "--log_interval=1",
                  f"--hessian_batch={hessian_batch}")
    n_micro_batches = hess_accumulation or 3
    assert len(recorder.forwards) == n_micro_batches and len(recorder.updates) == 1  # one pass, after iteration 1
    expected, norm = reference_hessian_gradient(recorder.forwards, grad_clip)
    if grad_clip:
        assert norm > 2 * grad_clip
    assert recorder.updates[0].keys() == expected.keys()
    for name, grad in recorder.updates[0].items():
        torch.testing.assert_close(grad.double(), expected[name], rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
    logged = [e for e in read_events(tmp_path, "train") if "hessian_grad_norm" in e]
    assert [e["iter"] for e in logged] == [1] and logged[0]["hessian_grad_norm"] == pytest.approx(norm, rel=1e-4)


class TrainingBatchRecorder:
    """Records the input of every training forward (targets given, model in training mode) and
    the global random state at that moment (from which dropout draws its masks)."""

    def __init__(self, monkeypatch):
        import model as model_module

        self.batches, self.rng_states = [], []
        real_forward = model_module.GPT.forward

        def forward(gpt, idx, targets=None, **kwargs):
            if targets is not None and gpt.training:
                self.batches.append((idx.clone(), targets.clone()))
                self.rng_states.append(torch.get_rng_state())
            return real_forward(gpt, idx, targets, **kwargs)

        monkeypatch.setattr(model_module.GPT, "forward", forward)


@pytest.mark.parametrize("hessian_batch", ["fresh", "step"])
def test_same_seed_runs_of_adamw_and_sophiag_train_on_the_same_batches(tiny_data, tmp_path, hessian_batch):
    """The Hessian pass (here after every step) draws its windows, labels and dropout masks from
    streams of its own, so SophiaG's training batches and dropout masks are AdamW's: same-seed runs
    are paired. With --hessian_batch=step the labels are drawn in the step's forward, from their own
    generator: the same holds."""
    recorded = {}
    for optimizer in ("adamw", "sophiag"):
        with pytest.MonkeyPatch.context() as monkeypatch:
            recorder = TrainingBatchRecorder(monkeypatch)
            train_sophiag(tiny_data, tmp_path / optimizer, f"--optimizer={optimizer}", "--hess_interval=1",
                          "--gradient_accumulation_steps=2", "--seed=7", "--dropout=0.1", f"--hessian_batch={hessian_batch}")
        recorded[optimizer] = recorder
    adamw, sophiag = recorded["adamw"].batches, recorded["sophiag"].batches
    assert len(adamw) == len(sophiag) == 8  # 4 steps x 2 micro-batches
    for (x_a, y_a), (x_s, y_s) in zip(adamw, sophiag):
        assert torch.equal(x_a, x_s) and torch.equal(y_a, y_s)
    assert not torch.equal(adamw[0][0], adamw[2][0])  # the batches do change from step to step
    for state_a, state_s in zip(recorded["adamw"].rng_states, recorded["sophiag"].rng_states):
        assert torch.equal(state_a, state_s)  # dropout draws the same masks in both runs


def test_the_hessian_pass_runs_with_dropout_on(tiny_data, tmp_path, monkeypatch):
    """The decision documented in optimizers.hessian_pass: the sampled-label forward runs in
    training mode, so dropout (here 0.1) applies to it as to the training steps."""
    import model as model_module

    modes = []
    real_forward = model_module.GPT.forward

    def forward(gpt, idx, targets=None, sample_labels_from_vocab=0, label_generator=None):
        if sample_labels_from_vocab:
            modes.append(gpt.training)
        return real_forward(gpt, idx, targets, sample_labels_from_vocab, label_generator)

    monkeypatch.setattr(model_module.GPT, "forward", forward)
    train_sophiag(tiny_data, tmp_path, "--hess_interval=2", "--dropout=0.1")
    assert modes == [True, True]

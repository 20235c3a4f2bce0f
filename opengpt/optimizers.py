"""Every optimizer train.py can run, in one place: its --optimizer name and label, how it is built
(parameter groups and weight decay included), the pass it needs after a step (SophiaG's Hessian
estimate) and the statistics it logs. train.py, bench.py, logs/plot_loss.py and
logs/compare_optimizers.py ask REGISTRY; model.py knows nothing of optimizers. The update rules
stay in their own files: torch.optim.AdamW, sophia.py (SophiaG), opengpt/muon.py (Muon + AdamW).

Adding another optimizer, say Lion, touches this file and one config:
1. here, a subclass of OptimizerSpec beside the others: `label` (its name in logs, plots and
   tables) and `build(model, cfg, device_type)` returning the torch.optim.Optimizer, its parameter
   groups from `param_groups(model, cfg)` so that it decays what the others decay. Override
   `step_kwargs` if its step() takes arguments, `after_step` if it needs a pass of its own after
   the step (as SophiaG's Hessian estimate), `before_step`/`statistics`/`log_text` to log
   numbers, `describe` for a line at start, `run_label` if a setting makes it another method;
2. add it to REGISTRY under its --optimizer name (train.py's choices and error message, bench.py
   and the plots' labels follow);
3. config/train_<model>_lion.py with optimizer = "lion" and its hyperparameters.
(To put it in the comparison too, give it a row in logs/compare_optimizers.py's METHODS and a grid
in its DEFAULTS: which methods an experiment compares, and on which grid, is the experiment's choice.)

The pass after a step receives opengpt/training.py's Training (see there): the model as forward
runs it, the optimizer, GradScaler and autocast, the micro-batch source and the generators.
"""
import inspect
from contextlib import contextmanager

import torch
import torch.distributed as dist

from opengpt.muon import MuonWithAdamW
from sophia import SophiaG


def param_groups(model, cfg):
    """Two groups: weight decay on the Linear weights, and on the embeddings (wte, which the head
    shares, and wpe) only with cfg["decay_embeddings"]; none on biases and LayerNorm weights.
    nanoGPT decays the embeddings; the Sophia authors do not, for AdamW and SophiaG alike."""
    embeddings = {id(module.weight) for module in model.modules() if isinstance(module, torch.nn.Embedding)}
    params = [p for p in model.parameters() if p.requires_grad]
    decayed = [p for p in params if p.dim() >= 2 and (cfg["decay_embeddings"] or id(p) not in embeddings)]
    decayed_ids = {id(p) for p in decayed}
    return [
        {"params": decayed, "weight_decay": cfg["weight_decay"]},
        {"params": [p for p in params if id(p) not in decayed_ids], "weight_decay": 0.0},
    ]


class OptimizerSpec:
    """What train.py needs to know about one optimizer. The defaults fit a plain torch optimizer."""
    label = ""

    def build(self, model, cfg, device_type):
        raise NotImplementedError

    def describe(self, cfg):
        """A line for the start of the run's log, or None."""
        return None

    def run_label(self, config):
        """The name of a run with this config in plots and tables."""
        return self.label

    def before_step(self, optimizer, track_stats):
        """Called before each step; track_stats is True on the steps that will be logged."""

    def step_kwargs(self, tokens_per_step):
        """Keyword arguments of optimizer.step()."""
        return {}

    def hessian_seeds_in_step(self, training, iter_num):
        """One label seed per micro-batch where the step of iteration iter_num should also compute the
        loss on labels drawn from the model (Training.accumulate_gradients), else None."""
        return None

    def after_step(self, training, iter_num):
        """A pass of its own after the step of iteration iter_num (gradients are zero); returns
        tensors to log at the next log step."""
        return {}

    def statistics(self, optimizer):
        """Numbers of the last step taken with track_stats, as floats (reads the device)."""
        return {}

    def log_text(self, stats):
        """What the text log line adds of the statistics (those and the pass's), e.g. ", win_rate 0.120"."""
        return ""


class AdamWSpec(OptimizerSpec):
    label = "AdamW"

    def build(self, model, cfg, device_type):
        # One fused kernel per parameter instead of ~10 foreach passes: on CUDA, and on CPUs too, where
        # it made the recipe's step() several times faster (logs/README.md#fused-adamw-on-a-cpu).
        fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
        extra = {"fused": True} if fused else {"foreach": True}
        return torch.optim.AdamW(param_groups(model, cfg), lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]), **extra)


class MuonSpec(OptimizerSpec):
    label = "Muon"

    def build(self, model, cfg, device_type):
        """Muon on the 2-D weights of the transformer blocks, AdamW on everything else."""
        hidden = [p for p in model.transformer.h.parameters() if p.dim() == 2]
        hidden_ids = {id(p) for p in hidden}
        rest = param_groups(model, cfg)
        for group in rest:
            group["params"] = [p for p in group["params"] if id(p) not in hidden_ids]
        # the fused query, key and value projection: three maps, orthogonalised one at a time
        stacked = {block.attn.c_attn.weight: 3 for block in model.transformer.h}
        return MuonWithAdamW(hidden, rest, lr=cfg["learning_rate"], weight_decay=cfg["weight_decay"],
                             betas=(cfg["beta1"], cfg["beta2"]), momentum=cfg["muon_momentum"], stacked=stacked)


class SophiaGSpec(OptimizerSpec):
    label = "SophiaG"

    def build(self, model, cfg, device_type):
        # with --compile, its step compiled too: one pass per parameter instead of eight (sophia.py)
        return SophiaG(param_groups(model, cfg), lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]), rho=cfg["rho"],
                       compiled=cfg["compile"])

    def describe(self, cfg):
        if cfg["hess_interval"] == 0:
            return "SophiaG with hess_interval=0: the Hessian is never estimated, so every step is sign momentum"
        n = hessian_micro_batches(cfg)
        if cfg["hessian_batch"] == "step":
            return (f"SophiaG: Hessian EMA updated every {cfg['hess_interval']} steps, from labels drawn in that step's own "
                    f"forward on its {n} micro-batches per process (--hessian_batch=step)")
        batch = "the whole optimizer batch" if n == cfg["gradient_accumulation_steps"] else f"{n} of the step's {cfg['gradient_accumulation_steps']}"
        return f"SophiaG: Hessian EMA updated every {cfg['hess_interval']} steps, from {n} micro-batches per process ({batch})"

    def run_label(self, config):
        k = config.get("hess_interval")
        return f"SophiaG (k={k})" if k != 0 else "SophiaG (k=0, sign momentum)"

    def before_step(self, optimizer, track_stats):
        optimizer.track_stats = track_stats

    def step_kwargs(self, tokens_per_step):
        return {"bs": tokens_per_step}  # the authors' bs: rho is tuned against tokens per step

    def hessian_due(self, cfg, iter_num):
        k = cfg["hess_interval"]
        return k > 0 and iter_num % k == k - 1

    def hessian_seeds_in_step(self, training, iter_num):
        if training.cfg["hessian_batch"] == "step" and self.hessian_due(training.cfg, iter_num):
            return label_seeds(training, training.cfg["gradient_accumulation_steps"])
        return None

    def after_step(self, training, iter_num):
        if not self.hessian_due(training.cfg, iter_num):
            return {}
        if training.cfg["hessian_batch"] == "step":
            return hessian_from_the_step(training)
        return hessian_pass(training)

    def statistics(self, optimizer):
        return optimizer.statistics()

    def log_text(self, stats):
        text = ""
        if "win_rate" in stats:
            text += (f", win_rate {stats['win_rate']:.3f} (rho for win_rate 0.1/0.5: "
                     f"{stats['ratio_q10']:.3g}/{stats['ratio_q50']:.3g})")
        if "hessian_grad_norm" in stats:
            text += f", hessian grad norm {stats['hessian_grad_norm']:.3g}"
        return text


def hessian_micro_batches(cfg):
    """Micro-batches per process in a Hessian estimate: hess_accumulation_steps, where 0 (the
    default) means gradient_accumulation_steps, the whole optimizer batch, as the authors do."""
    return cfg["hess_accumulation_steps"] or cfg["gradient_accumulation_steps"]


def label_seeds(t, n):
    """One seed per micro-batch for the Hessian loss's labels, taken from the shared Hessian generator
    (every rank draws all ranks' seeds and keeps its own), not from the per-rank global RNG: so 2
    processes sample the labels of 1 process with twice the accumulation, and resume repeats them."""
    return torch.randint(2**62, (t.world_size, n), generator=t.hessian_generator)[t.rank].tolist()


def hessian_pass(t):
    """SophiaG's Gauss-Newton-Bartlett estimate, as the authors' train_sophiag.py makes it: the
    loss on labels drawn from the model's own softmax, backpropagated over the Hessian micro-batches
    (all of the step's by default; DDP syncing on the last), the gradient clipped at grad_clip,
    then optimizer.update_hessian(). Returns the gradient's norm before clipping, to log.

    Dropout stays on, as in the training steps: the curvature to estimate is that of the loss the
    steps minimise, whose gradients make m; with it the estimate is somewhat larger and no noisier
    (logs/README.md#dropout-in-the-hessian-pass). The authors' configs use dropout 0, where the
    choice does not arise. Its masks come from a stream of the Hessian
    generator's, so the training steps' masks are those of a same-seed run of any optimizer."""
    n = hessian_micro_batches(t.cfg)
    batches = t.micro_batches(t.hessian_generator, n)
    seeds = label_seeds(t, n)
    with own_random_stream(t.device, seeds[0] + 1):  # a seed the label draws do not use
        t.accumulate_gradients(batches, seeds)
    return update_hessian_from_grads(t, t.scaler.get_scale() if t.scaler.is_enabled() else None)


def hessian_from_the_step(t):
    """The same estimate from the gradients the step's own forward left (--hessian_batch=step: its
    windows, its dropout masks, labels drawn in its head pass, before its update), averaged over the
    ranks as DDP would have."""
    grads, loss_scale = t.hessian_grads
    t.hessian_grads = None
    if t.world_size > 1:
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        grads = flat.div_(t.world_size).split([g.numel() for g in grads])
    for p, g in zip(t.raw_model.parameters(), grads):
        p.grad = g.view_as(p)
    return update_hessian_from_grads(t, loss_scale)


def update_hessian_from_grads(t, loss_scale):
    """optimizer.update_hessian() from the Hessian loss's gradients in .grad (divided by the
    GradScaler's loss_scale, if any) clipped at grad_clip; .grad is cleared. Returns the gradient's
    norm before clipping, to log."""
    params = [p for p in t.raw_model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    if loss_scale is not None:  # the GradScaler scaled these gradients: undo it
        torch._foreach_div_(grads, loss_scale)
    grad_norm = torch.nn.utils.get_total_norm(grads)
    # A float16 overflow (or a broken batch) would put inf or nan into h for good: skip this
    # estimate instead; h keeps its value. The same on every rank: their gradients were averaged.
    if torch.isfinite(grad_norm):
        if t.cfg["grad_clip"] > 0:  # clipped like the training gradient, as the authors do
            torch.nn.utils.clip_grads_with_norm_(params, t.cfg["grad_clip"], grad_norm)
        t.optimizer.update_hessian()
    t.optimizer.zero_grad(set_to_none=True)
    return {"hessian_grad_norm": grad_norm}


@contextmanager
def own_random_stream(device, seed):
    """Inside, the global random state (dropout's) of the CPU and of a CUDA device starts from
    `seed`; on leaving it is what it was before."""
    device = torch.device(device)
    cuda_index = (torch.cuda.current_device() if device.index is None else device.index) if device.type == "cuda" else None
    with torch.random.fork_rng(devices=[] if cuda_index is None else [cuda_index], device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        if cuda_index is not None:
            with torch.cuda.device(cuda_index):
                torch.cuda.manual_seed(seed)  # the current device's generator only
        yield


REGISTRY = {"adamw": AdamWSpec(), "sophiag": SophiaGSpec(), "muon": MuonSpec()}


def choices():
    """The --optimizer names as a sentence: "adamw, sophiag or muon"."""
    names = list(REGISTRY)
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]

"""Muon on the hidden weight matrices, AdamW on everything else, as one optimizer object.

Muon (Jordan et al. 2024; torch.optim.Muon) orthogonalises each 2-D update with Newton-Schulz
iterations; it is meant for hidden matrices only, so embeddings, the head, norms and biases use
AdamW, as in the modded-nanogpt speed records. Both run at the same learning rate: Muon's
"match_rms_adamw" scaling makes its updates the size AdamW's would be.

One departure from torch.optim.Muon: a weight that stacks several linear maps, as the attention's
fused query, key and value projection (3C, C) does, is orthogonalised one map at a time, as Muon's
authors do with separate projections. Orthogonalising the stack as one matrix couples the three
updates' scales; on our CPU recipe the split trained a little better (see
logs/README.md#muon-on-query-key-and-value-apart).
"""
import math
from collections import defaultdict

import torch

from opengpt import hardware
from sophia import loss_of

# The quintic Newton-Schulz coefficients of Jordan et al. (also torch.optim.Muon's defaults)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalise(update, steps=NS_STEPS, coefficients=NS_COEFFICIENTS, eps=1e-7, dtype=torch.bfloat16):
    """An approximation of U V^T for update = U S V^T, in `dtype`: X <- a X + (b A + c A^2) X with
    A = X X^T, from X = update / ||update||_F (so every singular value starts at most 1). These
    coefficients push each singular value into about [0.7, 1.2] rather than to exactly 1.
    update: one matrix (rows, cols) or a stack of them (n, rows, cols), each orthogonalised apart."""
    a, b, c = coefficients
    stack = update.to(dtype) if update.dim() == 3 else update.to(dtype).unsqueeze(0)
    wide = stack.size(1) <= stack.size(2)
    x = stack if wide else stack.mT  # A is the smaller Gram matrix
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    x = x if wide else x.mT
    return x if update.dim() == 3 else x[0]


def newton_schulz_dtype(device):
    """bfloat16, as Muon's authors and torch.optim.Muon iterate, except on a CPU without native
    bfloat16 matmuls (no AVX512_BF16 or AMX), where emulated bfloat16 products took about half the
    recipe's step and float32 ones are several times faster (logs/README.md#muon-in-float32-on-cpus-without-bf16)."""
    if device.type == "cpu" and not hardware.cpu_has_bf16_matmul():
        return torch.float32
    return torch.bfloat16


def adjusted_lr(lr, adjust_lr_fn, rows, cols):
    """The learning rate torch.optim.Muon applies to a (rows, cols) update: "match_rms_adamw" gives
    the update the RMS of AdamW's (0.2), so both share one learning rate; "original" (or None) is
    Keller Jordan's sqrt(max(1, rows / cols))."""
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn in (None, "original"):
        return lr * math.sqrt(max(1, rows / cols))
    raise ValueError(f"unknown adjust_lr_fn {adjust_lr_fn!r}")


class BlockwiseMuon(torch.optim.Muon):
    """torch.optim.Muon's update (Nesterov momentum, decoupled weight decay, its learning-rate
    scaling, "match_rms_adamw" here), with each weight in `stacked` orthogonalised as stacked[p]
    equal row blocks. Same state and parameter groups as torch.optim.Muon, so its checkpoints load
    either way and step alike."""

    def __init__(self, params, stacked=None, adjust_lr_fn="match_rms_adamw", ns_dtype=None, **kwargs):
        super().__init__(params, adjust_lr_fn=adjust_lr_fn, **kwargs)
        self.stacked = {id(p): blocks for p, blocks in (stacked or {}).items()}
        self.ns_dtype = ns_dtype  # the Newton-Schulz iteration's dtype; None: newton_schulz_dtype(the device)
        self.ns_dtypes = {}  # device -> newton_schulz_dtype(device), read once

    @torch.no_grad()
    def step(self, closure=None):
        loss = loss_of(closure)
        # Matrices of one shape (up to a transpose) are orthogonalised together, one batched product per
        # iteration instead of one per matrix (the recipe's 24 small matrices in two stacks): fewer, larger products.
        same_shape = defaultdict(list)  # (rows, cols, device, Newton-Schulz settings) -> [(view of p, wide update, tall, lr)]
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buffer = state["momentum_buffer"]
                buffer.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                p.mul_(1 - lr * group["weight_decay"])
                blocks = self.stacked.get(id(p), 1)
                for weight, block in zip(p.chunk(blocks, dim=0), update.chunk(blocks, dim=0)):  # views of p
                    tall = block.size(0) > block.size(1)  # stacked as its transpose, with the wide ones of that shape
                    wide = block.mT if tall else block
                    key = (*wide.shape, p.device, group["ns_steps"], tuple(group["ns_coefficients"]), group["eps"])
                    same_shape[key].append((weight, wide, tall, adjusted_lr(lr, group["adjust_lr_fn"], *block.shape)))
        for (_, _, device, ns_steps, coefficients, eps), matrices in same_shape.items():
            if device not in self.ns_dtypes:
                self.ns_dtypes[device] = self.ns_dtype or newton_schulz_dtype(device)
            updates = torch.stack([wide for _, wide, _, _ in matrices])
            orthogonal = orthogonalise(updates, ns_steps, coefficients, eps, self.ns_dtypes[device])
            for (weight, _, tall, step_size), matrix in zip(matrices, orthogonal):
                weight.add_(matrix.mT if tall else matrix, alpha=-step_size)
        return loss


class MuonWithAdamW(torch.optim.Optimizer):
    def __init__(self, hidden_matrices, other_groups, lr, weight_decay, betas, momentum=0.95, stacked=None):
        self.muon = BlockwiseMuon(hidden_matrices, stacked=stacked, lr=lr, weight_decay=weight_decay, momentum=momentum)
        self.adamw = torch.optim.AdamW(other_groups, lr=lr, betas=betas, foreach=True)
        # Deliberately not calling Optimizer.__init__: the two inner optimizers own the state.
        self.param_groups = self.muon.param_groups + self.adamw.param_groups
        self.defaults = {"lr": lr}
        self.state = {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = loss_of(closure)
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none=True):
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict):
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        # loading replaces the inner optimizers' group dicts: without this, the learning-rate schedule
        # would set the lr of the old ones, which nothing reads any more
        self.param_groups = self.muon.param_groups + self.adamw.param_groups

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

import torch

from sophia import loss_of

# The quintic Newton-Schulz coefficients of Jordan et al. (also torch.optim.Muon's defaults)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalise(update, steps=NS_STEPS, coefficients=NS_COEFFICIENTS, eps=1e-7):
    """An approximation of U V^T for update = U S V^T, in bfloat16: X <- a X + (b A + c A^2) X with
    A = X X^T, from X = update / ||update||_F (so every singular value starts at most 1). These
    coefficients push each singular value into about [0.7, 1.2] rather than to exactly 1."""
    a, b, c = coefficients
    wide = update.size(0) <= update.size(1)
    x = update.bfloat16() if wide else update.bfloat16().T  # A is the smaller Gram matrix
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x if wide else x.T


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

    def __init__(self, params, stacked=None, adjust_lr_fn="match_rms_adamw", **kwargs):
        super().__init__(params, adjust_lr_fn=adjust_lr_fn, **kwargs)
        self.stacked = {id(p): blocks for p, blocks in (stacked or {}).items()}

    @torch.no_grad()
    def step(self, closure=None):
        loss = loss_of(closure)
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
                    orthogonal = orthogonalise(block, group["ns_steps"], group["ns_coefficients"], group["eps"])
                    weight.add_(orthogonal, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], *block.shape))
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

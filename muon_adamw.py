"""Muon on the hidden weight matrices, AdamW on everything else, as one optimizer object.

Muon (Jordan et al. 2024; torch.optim.Muon) orthogonalises each 2-D update with Newton-Schulz
iterations; it is meant for hidden matrices only, so embeddings, the head, norms and biases use
AdamW, as in the modded-nanogpt speed records. Both run at the same learning rate: Muon's
"match_rms_adamw" scaling makes its updates the size AdamW's would be.
"""
import torch


class MuonWithAdamW(torch.optim.Optimizer):
    def __init__(self, hidden_matrices, other_groups, lr, weight_decay, betas, momentum=0.95):
        self.muon = torch.optim.Muon(hidden_matrices, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                     adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW(other_groups, lr=lr, betas=betas, foreach=True)
        # Deliberately not calling Optimizer.__init__: the two inner optimizers own the state.
        self.param_groups = self.muon.param_groups + self.adamw.param_groups
        self.defaults = {"lr": lr}
        self.state = {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
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

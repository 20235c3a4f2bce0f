"""An exponential moving average of the weights (Polyak averaging), evaluated and saved in their place.

With --ema_decay > 0, train.py keeps a float32 copy of every parameter and moves it toward the trained
weights after each step: average <- decay * average + (1 - decay) * weights. The average smooths out
the noise of the last few hundred steps, which a learning rate that decays to 10% of its peak still
leaves: in the CPU recipe's ten minutes it gave a better val loss than the weights themselves (see
config/train_zh_speedrun.py). Evaluations measure the average, and checkpoints save it as "model", so
sample.py, export.py and a checkpoint's users get the averaged model; the trained weights go into
the checkpoint as "trained_model", for --init_from=resume.
"""
from contextlib import contextmanager

import torch


class WeightAverage:
    def __init__(self, model, decay):
        self.decay = decay
        self.updates = 0
        self.params = [p.detach().float().clone() for p in model.parameters()]

    def decay_at(self, updates):
        """The decay of update number `updates` (from 1): short at first, (1 + n) / (10 + n) as in
        TensorFlow's ExponentialMovingAverage, so the random initial weights are soon forgotten."""
        return min(self.decay, (1 + updates) / (10 + updates))

    @torch.no_grad()
    def update(self, model):
        self.updates += 1
        weight = 1 - self.decay_at(self.updates)
        for average, p in zip(self.params, model.parameters()):
            average.lerp_(p.detach().float(), weight)

    @contextmanager
    def swapped_in(self, model):
        """The model holds the averaged weights inside the with block, its own ones again after it."""
        with torch.no_grad():
            trained = [p.detach().clone() for p in model.parameters()]
            for p, average in zip(model.parameters(), self.params):
                p.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, own in zip(model.parameters(), trained):
                    p.copy_(own)

    def averaged_state_dict(self, model):
        """model.state_dict() with the averaged weights, as copies."""
        with self.swapped_in(model):
            return {key: value.detach().clone() for key, value in model.state_dict().items()}

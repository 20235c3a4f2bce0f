"""ms per training step with and without --document_mask (model.document_layout), timed in alternation
in one process, so a shared machine's drift falls on both alike (bench.timed_in_alternation).

    python -m logs.document_mask_speed config/train_zh_speedrun.py --vocab_size=12288 --compile=False
    python -m logs.document_mask_speed config/train_zh_speedrun.py --vocab_size=12288 --compile=True

The batches are random tokens with an <|endoftext|> every `document_tokens` on average (the sentiment
chat data's conversations take ~96 tokens), both cases the same batches; the step is train_step, what
train.py runs. The numbers are printed; logs/README.md holds those of our CPU.
"""
import functools
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run by path (python logs/X.py) as well as python -m logs.X
import bench
import train
from configurator import parse_args
from opengpt import hardware
from opengpt.cli import UserError, run
from opengpt.training import train_step

DEFAULTS = train.DEFAULTS | dict(
    vocab_size=8192,  # tokens of the tokenizer (the default trained BPE's; padded to a multiple of 64 in the model)
    document_tokens=96,  # mean tokens per document in the random batches (each token is <|endoftext|> with 1 / this)
    warmup=5,  # untimed rounds first (compilation happens there)
    iters=20,  # timed rounds; each times one step of each case
)


class RandomDocuments(bench.RandomTokens):
    """bench.RandomTokens with token 0 (<|endoftext|> of our BPE) at a document's rate."""

    def __init__(self, block_size, vocab_size, document_tokens):
        super().__init__(block_size, vocab_size)
        self.document_tokens = document_tokens

    def train_micro_batches(self, generator, batch_size, count, rank, world_size):
        inputs, targets = super().train_micro_batches(generator, batch_size, count, rank, world_size)
        ends = [torch.rand(x.shape, generator=generator) < 1 / self.document_tokens for x in inputs]
        return [x.masked_fill(end, 0) for x, end in zip(inputs, ends)], targets


def main():
    cfg = parse_args(DEFAULTS, sys.argv[1:])
    if cfg["iters"] < 1:
        raise UserError(f"--iters={cfg['iters']} must be at least 1")
    device = hardware.pick_device(cfg["device"])
    dtype = hardware.pick_dtype(cfg["dtype"], device)
    if device == "cpu":
        hardware.keep_freed_memory()
    steps = {}
    for document_mask in (False, True):
        t = bench.build_training(cfg | dict(document_mask=document_mask), device, cfg["optimizer"], dtype, cfg["compile"])
        t.data = RandomDocuments(cfg["block_size"], cfg["vocab_size"], cfg["document_tokens"])
        steps[f"document_mask={document_mask}"] = functools.partial(train_step, t, 0)
    seconds = bench.timed_in_alternation(steps, device, cfg["warmup"], cfg["iters"])
    print(f"{cfg['n_layer']} layers x {cfg['n_embd']} wide, {cfg['batch_size']} x {cfg['block_size']} tokens, {cfg['optimizer']}, "
          f"{dtype}{', compiled' if cfg['compile'] else ', eager'}, on {hardware.device_name(device)}; median of {cfg['iters']} steps")
    baseline = seconds["document_mask=False"]
    for name, s in seconds.items():
        print(f"{name:20} {s * 1000:8.1f} ms/step  {s / baseline:5.2f}x")


if __name__ == "__main__":
    run(main)

"""opengpt/decode.py of an earlier commit against this checkout's, eager and compiled, in one process:
the recipe's model at vocabulary 8,192 and block 256, 200 sampled tokens (top-k 200), rounds alternated,
tokens checked identical, median tokens per second.

    python -m logs.decode_side_by_side --base=70b03d1 --rounds=5
"""
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run by path (python logs/X.py) as well as python -m logs.X
import bench
from configurator import parse_args
from model import sample_next_token
from opengpt import decode
from opengpt.cli import UserError, run


def module_at(rev, path):
    """The file `path` of commit `rev`, imported as a module of its own."""
    shown = subprocess.run(["git", "-C", REPO, "show", f"{rev}:{path}"], capture_output=True, text=True)
    if shown.returncode != 0:
        added = subprocess.run(["git", "-C", REPO, "log", "--diff-filter=A", "--format=%h", "--", path],
                               capture_output=True, text=True).stdout.split()
        earliest = f"; it was added in {added[-1]}: give that commit or a later one" if added else ""
        raise UserError(f"git cannot show {path} at --base={rev} ({(shown.stderr.strip().splitlines() or ['?'])[-1]}){earliest}")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(shown.stdout)
    try:
        spec = importlib.util.spec_from_file_location(f"decode_at_{rev}", f.name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        os.unlink(f.name)
    return module


def sample(path, n=200):
    """path: (a function making the decoding, the function drawing a token from logits)."""
    make_decoding, draw = path
    generator = torch.Generator().manual_seed(0)
    decoding = make_decoding()
    logits = decoding.prefill(torch.zeros(1, 1, dtype=torch.long))
    tokens = []
    for _ in range(n):
        token = draw(logits, 1.0, 200, generator)[:, 0]
        tokens.append(token.item())
        logits = decoding.step(token)
    return tokens


def main():
    cfg = parse_args(dict(base="HEAD", rounds=5), sys.argv[1:])
    if cfg["rounds"] < 1:
        raise UserError(f"--rounds={cfg['rounds']} must be at least 1")
    previous = module_at(cfg["base"], "opengpt/decode.py")
    model_cfg = parse_args(bench.DEFAULTS, [os.path.join(REPO, "config", "train_zh_speedrun.py"), "--vocab_size=8192",
                                            "--block_size=256"])
    model, _ = bench.build(model_cfg, "cpu")
    model.eval()
    cpu = torch.device("cpu")
    base_draw = getattr(previous, "draw", sample_next_token)
    paths = {f"decode.py at {cfg['base']}": (lambda: previous.CachedDecoding(model, 1, cpu), base_draw),
             f"compiled at {cfg['base']}": (lambda: previous.CachedDecoding(model, 1, cpu, compiled=True), base_draw),
             "eager": (lambda: decode.CachedDecoding(model, 1, cpu), decode.draw),
             "compiled": (lambda: decode.CachedDecoding(model, 1, cpu, compiled=True), decode.draw)}
    with torch.no_grad():
        tokens = [sample(path) for path in paths.values()]  # also compiles
        assert all(t == tokens[0] for t in tokens), "the paths drew different tokens"
        seconds = {name: [] for name in paths}
        for _ in range(cfg["rounds"]):
            for name, path in paths.items():
                started = time.perf_counter()
                sample(path)
                seconds[name].append(time.perf_counter() - started)
    median = {name: statistics.median(times) for name, times in seconds.items()}
    print(", ".join(f"{name} {200 / s:,.0f} tokens/s" for name, s in median.items()))


if __name__ == "__main__":
    run(main)

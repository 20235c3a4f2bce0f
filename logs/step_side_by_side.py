"""The default recipe's training step, this checkout against an older commit, side by side.

    python -m logs.step_side_by_side --base=7f4ced9                     # the first landed recipe
    python -m logs.step_side_by_side --base=7f4ced9 --rounds=3 --iters=400
    python -m logs.step_side_by_side --base=a338a80 --recipe=today  # today's recipe (python prepare.py --vocab_size=12288 first)

The older commit is checked out into a temporary git worktree (removed afterwards) that shares this
checkout's data/ folder. Both run `train.py config/train_zh_speedrun.py` with the first recipe's
shape and optimizer (FIRST_RECIPE), or with --recipe=today the config as it stands (4 layers, Muon,
the 12,288-token vocabulary), for the same steps, seed and schedule, one after the other,
round after round, so that a machine's drift falls on both. Each run reports its median ms per
step (from the steps after the first 50: compiling and warm-up are not the step) and its val bits
per character at the end, so a speed-up that changed the training shows as a changed loss.
`--extra` adds flags to this checkout's runs only (e.g. --compile=False).
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run by path (python logs/X.py) as well as python -m logs.X
from opengpt.cli import UserError, run
from configurator import parse_args
from opengpt.run_log import read_events

DEFAULTS = dict(
    base="7f4ced9",  # the commit that landed the recipe (config/train_zh_speedrun.py)
    rounds=2,
    iters=400,
    seed=1337,
    extra="",  # flags for this checkout's runs only, space-separated
    recipe="first",  # first: the recipe as 7f4ced9 landed it, for both; today: config/train_zh_speedrun.py as it is now
)
SKIP_STEPS = 50
# The recipe as 7f4ced9 landed it, given to both checkouts: the recipe has since grown (4 layers,
# batch 32, Muon, rotary positions, a larger vocabulary), and a step of a larger model is not the
# same step made faster.
FIRST_RECIPE = ["--n_layer=2", "--batch_size=16", "--optimizer=adamw", "--dataset=zh_default"]
# Flags the recipe gained after 7f4ced9, set as it was then: for this checkout only, as the base
# does not know them.
SINCE_FIRST_RECIPE = ["--rotary=False"]


def recipe_flags(cfg):
    """The flags both checkouts' runs get."""
    return FIRST_RECIPE if cfg["recipe"] == "first" else []


def this_checkouts_flags(cfg):
    return (SINCE_FIRST_RECIPE if cfg["recipe"] == "first" else []) + cfg["extra"].split()


def train(checkout, out_dir, cfg, extra):
    command = [sys.executable, "train.py", "config/train_zh_speedrun.py", f"--max_iters={cfg['iters']}",
               f"--lr_decay_iters={cfg['iters']}", f"--warmup_iters={cfg['iters'] // 10}", f"--seed={cfg['seed']}",
               f"--out_dir={out_dir}", "--log_interval=10", "--eval_interval=100000",
               "--device=cpu", *recipe_flags(cfg), *extra]  # a CPU comparison: the config no longer pins the device
    result = subprocess.run(command, cwd=checkout, capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"train.py failed in {checkout}: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    events = read_events(out_dir)
    ms = [e["time_ms"] for e in events if e.get("event") == "train" and e["iter"] >= SKIP_STEPS]
    final = [e for e in events if e.get("event") == "eval"][-1]
    return statistics.median(ms), final["val_bpc"]


def main():
    cfg = parse_args(DEFAULTS, sys.argv[1:])
    if cfg["recipe"] not in ("first", "today"):
        raise UserError(f"unknown --recipe={cfg['recipe']}; use first or today")
    if cfg["rounds"] < 1:
        raise UserError(f"--rounds={cfg['rounds']} must be at least 1")
    if cfg["iters"] <= SKIP_STEPS + 10:
        raise UserError(f"--iters must be above {SKIP_STEPS + 10}: the first {SKIP_STEPS} steps are not timed")
    with tempfile.TemporaryDirectory() as scratch:
        base = os.path.join(scratch, "base")
        added = subprocess.run(["git", "worktree", "add", "--detach", base, cfg["base"]], cwd=REPO, capture_output=True, text=True)
        if added.returncode != 0:
            raise UserError(f"cannot check out --base={cfg['base']}: {added.stderr.strip().splitlines()[-1]}")
        try:
            os.symlink(os.path.join(REPO, "data"), os.path.join(base, "data"))
            checkouts = {f"base {cfg['base']}": (base, []), "this checkout": (REPO, this_checkouts_flags(cfg))}
            results = {name: [] for name in checkouts}
            for round_index in range(cfg["rounds"]):
                for name, (checkout, extra) in checkouts.items():
                    ms, bpc = train(checkout, os.path.join(scratch, f"{name[:4]}_round{round_index}"), cfg, extra)
                    results[name].append((ms, bpc))
                    print(f"round {round_index + 1}, {name}: {ms:.1f} ms per step, val {bpc:.3f} bits/char", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", base], cwd=REPO, capture_output=True)
    medians = {name: statistics.median(ms for ms, _ in runs) for name, runs in results.items()}
    base_ms, ours_ms = medians.values()
    print(json.dumps({"ms_per_step": medians, "speedup": round(base_ms / ours_ms, 3)}))
    print(f"this checkout takes {ours_ms:.1f} ms per step, {cfg['base']} {base_ms:.1f}: {base_ms / ours_ms:.2f}x fewer "
          f"(medians over {cfg['rounds']} rounds of {cfg['iters']} steps, seed {cfg['seed']})")


if __name__ == "__main__":
    run(main)

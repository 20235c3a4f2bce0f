"""AdamW vs SophiaG vs Muon on the tiny Chinese GPT, honestly: a learning-rate sweep for every
optimizer, then several seeds at the chosen rate, then a table and a plot.

    python logs/compare_optimizers.py             # the whole experiment; finished runs are skipped
    python logs/compare_optimizers.py --workers=1 --threads_per_run=2

Methods: AdamW; SophiaG with the Hessian estimated every 10 steps; SophiaG with hess_interval=0
(the configuration of the project this one is modelled on: no Hessian, so sign momentum); Muon on
the hidden matrices with AdamW on the rest. Each gets the same model (config/train_tiny_zh.py), data,
warmup and cosine schedule decaying fully to lr/10 at the last step, and no weight decay on the
embeddings (the Sophia authors' choice; README says why). The learning rate of each is
the grid value with the lowest final val loss on sweep_seed; when that is at the edge of the grid
the grid is extended (at most max_extensions times), so no method is judged on a rate that is too
small or too large. To fit a CPU budget the sweep's runs are sweep_iters steps long, with the same
warmup and a schedule that decays fully by their own last step. The final numbers are the seeds in
`seeds`, none of them the sweep seed, at max_iters steps.

Every run is an ordinary train.py run with its own out_dir under `out`/runs; a run whose
metrics.jsonl already holds its last evaluation is skipped, an interrupted one resumes from its
checkpoint. The results go to `out`/results.md and `out`/loss.png, and between the markers
<!-- compare:begin --> and <!-- compare:end --> in the README.
"""
import concurrent.futures
import json
import os
import platform
import re
import subprocess
import sys
import time

from pathlib import Path

import numpy as np

# This script lives in logs/; the repository root holds the modules and train.py.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from cli import UserError, replace_marked_section, run, write_atomically  # noqa: E402
from run_log import read_events  # noqa: E402
from configurator import parse_args  # noqa: E402
from plot_loss import load_run, plot  # noqa: E402

DEFAULTS = dict(
    out="logs/compare",
    data_dir="data/zh_default",
    workers=2,  # runs at a time
    threads_per_run=1,  # torch threads per run (OMP_NUM_THREADS)
    max_iters=1000,
    sweep_iters=500,  # the sweep's runs are shorter (with their own full schedule), to fit a CPU budget
    batch_size=6,  # 6 sequences x 64 tokens = 384 tokens per step on a CPU
    warmup_iters=100,
    eval_interval=250,
    sweep_seed=0,
    seeds=(1, 2, 3),
    max_extensions=2,
    readme="README.md",
)

# Each method's name is the label its runs get in plots (optimizers.REGISTRY[...].run_label; tested).
METHODS = {
    "AdamW": dict(args=["--optimizer=adamw", "--beta1=0.9", "--beta2=0.95", "--weight_decay=0.1"],
                  grid=(1e-3, 2e-3, 4e-3)),
    "SophiaG (k=10)": dict(args=["--optimizer=sophiag", "--beta1=0.965", "--beta2=0.99", "--weight_decay=0.2",
                                 "--rho=0.05", "--hess_interval=10"], grid=(2.5e-4, 5e-4, 1e-3)),
    "SophiaG (k=0, sign momentum)": dict(args=["--optimizer=sophiag", "--beta1=0.965", "--beta2=0.99",
                                               "--weight_decay=0.2", "--rho=0.05", "--hess_interval=0"],
                                         grid=(2.5e-4, 5e-4, 1e-3)),
    "Muon": dict(args=["--optimizer=muon", "--beta1=0.9", "--beta2=0.95", "--weight_decay=0.1"],
                 grid=(1e-3, 2e-3, 4e-3)),
}
BASELINE = "AdamW"
# The older project's table (one seed, 6 val records, Hessian never updated, schedule still warming up).
OLDER_TABLE = {"AdamW": (2.8763, 2.7097), "Sophia": (2.7042, 2.5157)}


def slug(method):
    """A folder name for a method: "SophiaG (k=10)" -> "sophiag-k-10"."""
    return re.sub(r"[^a-z0-9]+", "-", method.lower()).strip("-")


def run_dir(cfg, method, lr, seed):
    return os.path.join(cfg["out"], "runs", f"{slug(method)}_lr{lr:g}_seed{seed}_iters{iters_for(cfg, seed)}")


def iters_for(cfg, seed):
    """The sweep (on sweep_seed) runs sweep_iters steps, the final runs max_iters."""
    return cfg["sweep_iters"] if seed == cfg["sweep_seed"] else cfg["max_iters"]


def train_command(cfg, method, lr, seed, out_dir, resume):
    iters = iters_for(cfg, seed)
    return [
        sys.executable, os.path.join(REPO, "train.py"), os.path.join(REPO, "config", "train_tiny_zh.py"),
        *METHODS[method]["args"], f"--learning_rate={lr}", f"--min_lr={lr / 10}", f"--seed={seed}",
        f"--out_dir={out_dir}", f"--data_dir={os.path.abspath(cfg['data_dir'])}", "--gradient_accumulation_steps=1", f"--batch_size={cfg['batch_size']}",
        f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--warmup_iters={cfg['warmup_iters']}",
        f"--eval_interval={cfg['eval_interval']}", "--device=cpu", "--dtype=float32",
        "--decay_embeddings=False",  # the Sophia authors' weight decay, for every method (README: why)
        f"--init_from={'resume' if resume else 'scratch'}",
    ]


def finished(out_dir, iters):
    """Whether the run's log holds its last evaluation."""
    return any(e.get("event") == "eval" and e.get("iter") == iters for e in read_events(out_dir))


def train_one(cfg, method, lr, seed):
    """Run (or finish) one training run; returns its out_dir."""
    out_dir = run_dir(cfg, method, lr, seed)
    if finished(out_dir, iters_for(cfg, seed)):
        return out_dir
    resume = os.path.isfile(os.path.join(out_dir, "ckpt.pt"))
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads_per_run"]), PYTHONUNBUFFERED="1")
    with open(os.path.join(out_dir, "train.log"), "a", encoding="utf-8") as log:
        result = subprocess.run(train_command(cfg, method, lr, seed, out_dir, resume), cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0 or not finished(out_dir, iters_for(cfg, seed)):
        raise RuntimeError(f"run {out_dir} failed (exit {result.returncode}); see {out_dir}/train.log")
    os.remove(os.path.join(out_dir, "ckpt.pt"))  # 80 MB each; the log is what the comparison needs
    print(f"finished {out_dir}", flush=True)
    return out_dir


def train_all(cfg, jobs):
    """Run (method, lr, seed) jobs, `workers` at a time."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=cfg["workers"]) as pool:
        for future in [pool.submit(train_one, cfg, *job) for job in jobs]:
            future.result()


def final_val_loss(cfg, method, lr, seed):
    return load_run(run_dir(cfg, method, lr, seed)).val.loss[-1]


def sweep(cfg):
    """({method: grid run}, {method: chosen lr}), extending a grid whose best value is at its edge."""
    grids = {method: list(spec["grid"]) for method, spec in METHODS.items()}

    def best_lr(method):
        grid = grids[method]
        return grid[int(np.argmin([final_val_loss(cfg, method, lr, cfg["sweep_seed"]) for lr in grid]))]

    for extensions in range(cfg["max_extensions"] + 1):
        train_all(cfg, [(m, lr, cfg["sweep_seed"]) for m, grid in grids.items() for lr in grid])
        best = {method: best_lr(method) for method in grids}
        at_edge = [m for m, grid in grids.items() if best[m] in (grid[0], grid[-1])]
        if not at_edge or extensions == cfg["max_extensions"]:
            break
        for method in at_edge:
            grid = grids[method]
            if best[method] == grid[0]:
                grid.insert(0, grid[0] / 2)
            else:
                grid.append(grid[-1] * 2)
    return grids, best


def steps_to_reach(run_val, target):
    """First step at which the val curve reaches target, interpolated linearly between
    evaluations; None if it never does."""
    steps, loss = run_val.steps, run_val.loss
    for i in range(len(steps)):
        if loss[i] <= target:
            if i == 0:
                return int(steps[0])
            fraction = (loss[i - 1] - target) / (loss[i - 1] - loss[i])
            return int(round(steps[i - 1] + fraction * (steps[i] - steps[i - 1])))
    return None


def eval_at(run_, step):
    index = np.flatnonzero(run_.val.steps == step)
    return run_.val.loss[index[0]] if index.size else float("nan")


def train_eval_loss(out_dir, step):
    losses = [e["train_loss"] for e in read_events(out_dir) if e.get("event") == "eval" and e["iter"] == step]
    return losses[-1]


def wall_seconds(out_dir):
    """First config event to last event of the run's log."""
    events = read_events(out_dir)
    return events[-1]["time"] - events[0]["time"]


def summarise(cfg, chosen):
    """{method: dict of mean/std numbers over the final seeds}."""
    rows = {}
    for method, lr in chosen.items():
        dirs = [run_dir(cfg, method, lr, seed) for seed in cfg["seeds"]]
        runs = [load_run(d) for d in dirs]
        final = cfg["max_iters"]
        rows[method] = dict(
            lr=lr,
            train=[train_eval_loss(d, final) for d in dirs],
            val=[r.val.loss[-1] for r in runs],
            val_half=[eval_at(r, final // 2) for r in runs],
            seconds=[wall_seconds(d) for d in dirs],
            runs=runs,
        )
    target = float(np.mean(rows[BASELINE]["val"]))
    for row in rows.values():
        row["steps_to_target"] = [steps_to_reach(r.val, target) for r in row["runs"]]
    return rows, target


def mean_std(values, digits=4):
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1) if values.size > 1 else 0.0:.{digits}f}"


def relative_gain(baseline, value):
    """Improvement over AdamW as the older table wrote it: (AdamW - X) / AdamW, positive = lower loss."""
    return f"{(baseline - value) / baseline * 100:+.2f}%"


def results_markdown(cfg, grids, chosen, rows, target, total_seconds, machine):
    base_train, base_val = np.mean(rows[BASELINE]["train"]), np.mean(rows[BASELINE]["val"])
    tokens = cfg["batch_size"] * 64
    with open(os.path.join(cfg["data_dir"], "meta.json"), encoding="utf-8") as f:
        val_documents = json.load(f)["splits"]["val"]["documents"]
    lines = [
        f"Tiny GPT (2 layers, 2 heads, 128 wide, block 64, dropout 0.1) on the default corpus; "
        f"{cfg['max_iters']} steps x {tokens} tokens ({cfg['batch_size']} x 64, no accumulation) = "
        f"{cfg['max_iters'] * tokens / 1e6:.2f}M tokens per run; warmup {cfg['warmup_iters']} steps, cosine to lr/10 at step "
        f"{cfg['max_iters']}; val loss over the whole val split ({val_documents} documents of {cfg['data_dir']}) "
        f"every {cfg['eval_interval']} steps. Mean ± std over seeds {', '.join(map(str, cfg['seeds']))}; the learning rate of each "
        f"optimizer is the best final val loss of its sweep on seed {cfg['sweep_seed']} ({cfg['sweep_iters']}-step runs, same warmup, "
        f"decayed fully by their last step; the best rate in bold).",
        "",
        f"| optimizer | lr (sweep) | train loss | val loss | vs AdamW (train / val) | val @{cfg['max_iters'] // 2} | "
        f"val @{cfg['max_iters']} | steps to AdamW's val loss | wall-clock per run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, row in rows.items():
        sweep_text = ", ".join(f"**{lr:g}**" if lr == chosen[method] else f"{lr:g}" for lr in grids[method])
        reached = row["steps_to_target"]
        if all(s is not None for s in reached):
            steps_text = f"{np.mean(reached):.0f}"
        else:
            steps_text = f"not reached ({sum(s is None for s in reached)}/{len(reached)} seeds)"
        gains = f"{relative_gain(base_train, np.mean(row['train']))} / {relative_gain(base_val, np.mean(row['val']))}"
        lines.append(
            f"| {method} | {sweep_text} | {mean_std(row['train'])} | {mean_std(row['val'])} | {gains if method != BASELINE else '—'} | "
            f"{mean_std(row['val_half'])} | {mean_std(row['val'])} | {steps_text} | {np.mean(row['seconds']):.0f} s |")
    at_edge = [m for m in rows if chosen[m] in (grids[m][0], grids[m][-1])]
    if at_edge:
        lines += ["", f"The best rate was at the edge of its sweep for {', '.join(at_edge)}: a wider sweep "
                      f"(--max_extensions, {cfg['max_extensions']} here) may find a better one."]
    old = OLDER_TABLE
    lines += [
        "",
        f"AdamW's mean final val loss, the target of the steps column: {target:.4f} (interpolated between evaluations). "
        f"\"vs AdamW\" is (AdamW − X) / AdamW of the mean loss, positive when X is lower, as in the older table.",
        "",
        f"The older project's table, for comparison: AdamW {old['AdamW'][0]} / {old['AdamW'][1]}, \"Sophia\" "
        f"{old['Sophia'][0]} / {old['Sophia'][1]} (train / dev; \"+5.98% / +7.16%\"). It came from one seed, 6 dev records, "
        f"2000 steps with 2000 warmup steps (the learning rate never decayed), no tuned learning rate, and a SophiaG whose "
        f"Hessian was never estimated, i.e. the \"SophiaG (k=0, sign momentum)\" row here.",
        "",
        f"Machine: {machine}; {cfg['workers']} runs at a time, {cfg['threads_per_run']} thread(s) each. "
        f"All {sum(len(g) for g in grids.values()) + len(rows) * len(cfg['seeds'])} runs took {total_seconds / 60:.0f} minutes of "
        f"wall-clock time in all. Command: `{' '.join(['python logs/compare_optimizers.py', *sys.argv[1:]])}` (torch {torch_version()}).",
    ]
    return "\n".join(lines) + "\n"


def torch_version():
    import torch

    return torch.__version__


def experiment_span(cfg, grids, chosen):
    """Wall-clock seconds from the first run's start to the last run's end."""
    dirs = [run_dir(cfg, m, lr, cfg["sweep_seed"]) for m, grid in grids.items() for lr in grid]
    dirs += [run_dir(cfg, m, lr, s) for m, lr in chosen.items() for s in cfg["seeds"]]
    logs = [read_events(d) for d in dirs]
    return max(events[-1]["time"] for events in logs) - min(events[0]["time"] for events in logs)


def main():
    cfg = parse_args(DEFAULTS, sys.argv[1:])
    if cfg["sweep_seed"] in cfg["seeds"]:
        raise UserError(f"--sweep_seed={cfg['sweep_seed']} is one of --seeds: the final numbers must not reuse the sweep's seed")
    for key in ("workers", "threads_per_run", "max_iters", "sweep_iters", "batch_size"):
        if cfg[key] <= 0:
            raise UserError(f"--{key} must be positive")
    if not os.path.isfile(os.path.join(cfg["data_dir"], "meta.json")):
        raise UserError(f"{cfg['data_dir']} is missing; run python prepare.py first")
    os.makedirs(cfg["out"], exist_ok=True)
    started = time.time()
    grids, chosen = sweep(cfg)
    print(f"chosen learning rates: {chosen} (sweep took {(time.time() - started) / 60:.1f} min)", flush=True)
    train_all(cfg, [(m, lr, seed) for m, lr in chosen.items() for seed in cfg["seeds"]])

    rows, target = summarise(cfg, chosen)
    machine = load_run(run_dir(cfg, BASELINE, chosen[BASELINE], cfg["seeds"][0])).machine or platform.processor()
    table = results_markdown(cfg, grids, chosen, rows, target, experiment_span(cfg, grids, chosen), machine)
    write_atomically(os.path.join(cfg["out"], "results.md"), lambda path: Path(path).write_text(table, encoding="utf-8"))
    plot({method: row["runs"] for method, row in rows.items()}, os.path.join(cfg["out"], "loss.png"))
    readme = os.path.join(REPO, cfg["readme"])
    print(table)
    print(f"wrote {cfg['out']}/results.md and {cfg['out']}/loss.png" +
          (f"; updated {readme}" if replace_marked_section(readme, "compare", table) else ""))


if __name__ == "__main__":
    run(main)

"""AdamW vs SophiaG vs sign momentum vs Muon on a small Chinese GPT, at two batch sizes: a sweep
for every optimizer, three seeds at each winner, then the report `out`/results.md with its table and
plots (logs/compare_report.py writes those). One command, resumable:

    python -m logs.compare_optimizers                    # the CPU protocol (~1 hour on 2 cores)
    python -m logs.compare_optimizers --preset=gpu       # the same protocol sized for one large GPU
    python -m logs.compare_optimizers --dry_run=True     # the whole pipeline at a toy size, into a temp dir

The protocol (every number is a flag below):
- Model: the first recipe's shape (2 layers, 2 heads, 128 wide, no bias, dropout 0; the recipe
  in config/train_zh_speedrun.py has since grown) at block 64, on data/zh_default (the 8,192-token
  BPE). No weight decay on the embeddings for any method (--decay_embeddings=False, the Sophia
  authors' choice; why: logs/README.md#sophiags-choices-measured).
- Batch sizes (sequences per step): 8 x 64 = 512 and 128 x 64 = 8,192 tokens per step, each run
  the same number of tokens (tokens_per_run), so the large batch takes 16x fewer steps. Warmup is
  a fixed fraction of the steps, cosine decay to lr/10 at the last step; the whole val split is
  evaluated at ~evals_per_run points and at the end.
- Sweep, on sweep_seed, as long as the finals: a learning-rate grid per method, and for SophiaG
  (k=10) a learning-rate grid per rho. A grid whose best point is on an edge grows by a factor 2
  on that side (for SophiaG also the rho set, when the best rho is its smallest or largest), at
  most max_extensions times; a winner still on an edge is "inconclusive" in the table. The two
  batch sizes are swept independently: the best learning rate depends on the batch.
- Finals: `seeds` at each method's winner. A seed fixes the training batches whatever the
  optimizer (SophiaG's Hessian pass draws from a generator of its own), so seeds pair across methods.

Every run is a train.py run in `out`/runs/<batch>/<method>_...; a run whose metrics.jsonl holds its
last evaluation (or which diverged: DIVERGED in its folder) is skipped, an interrupted one resumes
from its checkpoint, and a finished run's checkpoint is deleted (metrics.jsonl and train.log stay).
"""
import concurrent.futures
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run by path (python logs/X.py) as well as python -m logs.X
from opengpt.cli import UserError, run
from logs.compare_grids import best_point, extend
from configurator import parse_args
from opengpt.run_log import read_events

DEFAULTS = dict(
    preset="cpu",  # cpu | gpu: the defaults below, or PRESETS["gpu"] over them
    dry_run=False,  # True: DRY_RUN over the preset, a toy size into a temp dir (a check of the pipeline)
    out="logs/compare",
    data_dir="data/zh_default",
    workers=2,  # runs at a time
    threads_per_run=1,  # OMP_NUM_THREADS of each run
    run_timeout_minutes=0.0,  # per-run wall-clock guard (0 = none): see run_one
    device="cpu",
    dtype="auto",  # bfloat16 where the CPU multiplies it natively, else float32
    compile=False,
    n_layer=2,
    n_head=2,
    n_embd=128,
    block_size=64,
    batch_sizes=(8, 128),  # sequences per step: 512 and 8,192 tokens per step at block 64
    # the same for every batch size: 1562 steps at 8 x 64, 98 at 128 x 64. 0.8M rather than 1M keeps
    # the whole protocol near an hour on 2 cores (estimated from step times, loaded machine: ~50 min
    # without grid extensions at 0.8M, ~60 at 1M, plus ~10-15 for a typical dozen extension runs)
    tokens_per_run=800_000,
    warmup_fraction=0.05,
    min_lr_ratio=0.1,  # cosine to lr * min_lr_ratio at the last step
    evals_per_run=8,  # whole-val-split evaluations after step 0 (plus one at the last step)
    logs_per_run=40,  # train log lines (SophiaG's win_rate is logged on these)
    eval_iters=4,  # train batches per evaluation (a check only; val is the whole split)
    sweep_seed=0,
    seeds=(1, 2, 3),
    max_extensions=2,
    adamw_lrs=(1e-3, 2e-3, 4e-3, 8e-3),
    # SophiaG (k=10): a learning-rate grid per rho. A clipped coordinate steps lr * sign(m), an
    # unclipped one (lr / rho) * m / (bs * h). At rho 0.05 most coordinates are clipped (win_rate
    # ~0.1 in the previous table), so its best lr is near sign momentum's (2.5e-4 there). A larger
    # rho unclips more coordinates and shrinks their step (lr / rho), so its best lr is larger,
    # though by less than rho (the clipped coordinates still step lr): 2x per row here.
    sophiag_lrs={0.05: (2.5e-4, 5e-4, 1e-3), 0.3: (5e-4, 1e-3, 2e-3), 2.0: (1e-3, 2e-3, 4e-3)},
    sign_momentum_lrs=(1.25e-4, 2.5e-4, 5e-4),  # the previous table's best was 2.5e-4, at its lower edge
    muon_lrs=(1e-3, 2e-3, 4e-3),
)

# The GPU protocol: the same sweep and seeds, a 4 x 256 model at block 128, 16 x 128 = 2,048 and
# 256 x 128 = 32,768 tokens per step, 4M tokens per run (1953 and 122 steps), eight
# runs at a time on the one GPU. Sized (by estimate; not yet run) for under 10 minutes on an H100/H200: ~70 runs of
# ~30-60 s each, 8 at a time. data/zh_default's train split is 1.76M tokens, so a run sees it ~2.3
# times; give --data_dir a larger prepared corpus to avoid repeating it.
PRESETS = {
    "cpu": {},
    "gpu": dict(device="cuda", dtype="bfloat16", workers=8, n_layer=4, n_head=4, n_embd=256, block_size=128,
                batch_sizes=(16, 256), tokens_per_run=4_000_000, run_timeout_minutes=5.0),
}
# A toy size that runs the whole pipeline in well under a minute on 2 CPU cores.
DRY_RUN = dict(device="cpu", dtype="float32", workers=2, n_layer=1, n_head=2, n_embd=16, block_size=16,
               batch_sizes=(2, 8), tokens_per_run=768, evals_per_run=3, logs_per_run=3, eval_iters=1,
               seeds=(1,), max_extensions=0, adamw_lrs=(1e-2,), sophiag_lrs={0.3: (1e-2,)},
               sign_momentum_lrs=(1e-2,), muon_lrs=(1e-2,), run_timeout_minutes=0.0)

# Each method's name is the label its runs get in plots (optimizers.REGISTRY[...].run_label; tested).
METHODS = {
    "AdamW": dict(args=["--optimizer=adamw", "--beta1=0.9", "--beta2=0.95", "--weight_decay=0.1"], grid="adamw_lrs"),
    "SophiaG (k=10)": dict(args=["--optimizer=sophiag", "--beta1=0.965", "--beta2=0.99", "--weight_decay=0.2",
                                 "--hess_interval=10"], grid="sophiag_lrs"),
    # rho does not matter without a Hessian estimate: every coordinate is clipped
    "SophiaG (k=0, sign momentum)": dict(args=["--optimizer=sophiag", "--beta1=0.965", "--beta2=0.99",
                                               "--weight_decay=0.2", "--rho=0.05", "--hess_interval=0"],
                                         grid="sign_momentum_lrs"),
    "Muon": dict(args=["--optimizer=muon", "--beta1=0.9", "--beta2=0.95", "--weight_decay=0.1"], grid="muon_lrs"),
}
BASELINE = "AdamW"
RHO_SEARCHED = "SophiaG (k=10)"
DIVERGED = "DIVERGED"  # a file in a run's folder: train.py stopped it for non-finite losses


def config_from(argv):
    """DEFAULTS, then the preset, then DRY_RUN if asked, then the command line."""
    # a one-value sequence may be given bare: --batch_sizes=128 is (128,)
    bare = tuple(f"--{key}=" for key, value in DEFAULTS.items() if isinstance(value, tuple))
    argv = [f"{a}," if a.startswith(bare) and "," not in a else a for a in argv]
    first = parse_args(DEFAULTS, argv)
    if first["preset"] not in PRESETS:
        raise UserError(f"--preset={first['preset']}: choose {' or '.join(PRESETS)}")
    base = DEFAULTS | PRESETS[first["preset"]] | (DRY_RUN if first["dry_run"] else {})
    cfg = parse_args(base, argv)
    if makes_its_out(cfg, argv):
        cfg["out"] = tempfile.mkdtemp(prefix="compare_dry_run_")
    check(cfg)
    return cfg


def makes_its_out(cfg, argv):
    """Whether --out is a temp folder this script makes: a dry run's, when no --out is given."""
    return cfg["dry_run"] and not any(arg.startswith("--out=") for arg in argv)


def check(cfg):
    if cfg["sweep_seed"] in cfg["seeds"]:
        raise UserError(f"--sweep_seed={cfg['sweep_seed']} is one of --seeds: the final numbers must not reuse the sweep's seed")
    for key in ("workers", "threads_per_run", "tokens_per_run", "n_layer", "n_head", "n_embd", "block_size",
                "evals_per_run", "logs_per_run", "eval_iters"):
        if cfg[key] <= 0:
            raise UserError(f"--{key} must be positive")
    if not cfg["batch_sizes"] or any(b <= 0 for b in cfg["batch_sizes"]):
        raise UserError("--batch_sizes must be positive sequence counts, e.g. --batch_sizes=8,128")
    if not 0 <= cfg["warmup_fraction"] < 1:
        raise UserError("--warmup_fraction must be in [0, 1)")
    for method, spec in METHODS.items():
        grid = cfg[spec["grid"]]
        rows = list(grid.values()) if isinstance(grid, dict) else [grid]
        values = [lr for row in rows if isinstance(row, (tuple, list)) for lr in row]
        if not values or len(rows) > sum(isinstance(row, (tuple, list)) for row in rows) or \
                any(not isinstance(lr, (int, float)) or lr <= 0 for lr in values):
            raise UserError(f"--{spec['grid']} must hold positive learning rates"
                            + (", a tuple per rho: --sophiag_lrs='{0.3: (1e-3, 2e-3)}'" if isinstance(grid, dict) else ""))
    if not os.path.isfile(os.path.join(cfg["data_dir"], "meta.json")):
        raise UserError(f"{cfg['data_dir']} is missing; run python prepare.py first")


# -- the schedule of one run ---------------------------------------------------------------------

def tokens_per_step(cfg, batch):
    return batch * cfg["block_size"]


def steps_per_run(cfg, batch):
    """Optimizer steps that spend tokens_per_run tokens at this batch size (at least 2)."""
    return max(2, round(cfg["tokens_per_run"] / tokens_per_step(cfg, batch)))


def schedule(cfg, batch):
    """(max_iters, warmup_iters, eval_interval, log_interval) of every run at this batch size."""
    iters = steps_per_run(cfg, batch)
    warmup = min(iters - 1, max(1, round(cfg["warmup_fraction"] * iters)))
    return iters, warmup, max(1, iters // cfg["evals_per_run"]), max(1, iters // cfg["logs_per_run"])


# -- runs ------------------------------------------------------------------------------------------

def slug(method):
    """A folder name for a method: "SophiaG (k=10)" -> "sophiag-k-10"."""
    return re.sub(r"[^a-z0-9]+", "-", method.lower()).strip("-")


def batch_folder(cfg, batch):
    return f"{batch}x{cfg['block_size']}"


def run_dir(cfg, batch, method, rho, lr, seed):
    rho_part = f"_rho{rho:g}" if rho is not None else ""
    return os.path.join(cfg["out"], "runs", batch_folder(cfg, batch), f"{slug(method)}{rho_part}_lr{lr:g}_seed{seed}")


def train_command(cfg, batch, method, rho, lr, seed, out_dir, resume):
    """The train.py command line of one run (tested: the protocol lives in these flags)."""
    iters, warmup, eval_interval, log_interval = schedule(cfg, batch)
    return [
        sys.executable, os.path.join(REPO, "train.py"), *METHODS[method]["args"],
        *([f"--rho={rho}"] if rho is not None else []),
        f"--learning_rate={lr}", f"--min_lr={lr * cfg['min_lr_ratio']}", f"--seed={seed}",
        f"--out_dir={os.path.abspath(out_dir)}", f"--data_dir={os.path.abspath(cfg['data_dir'])}",
        f"--n_layer={cfg['n_layer']}", f"--n_head={cfg['n_head']}", f"--n_embd={cfg['n_embd']}",
        f"--block_size={cfg['block_size']}", "--bias=False", "--dropout=0.0",
        f"--batch_size={batch}", "--gradient_accumulation_steps=1",
        f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--warmup_iters={warmup}",
        f"--eval_interval={eval_interval}", f"--eval_iters={cfg['eval_iters']}", "--val_full_split=True",
        f"--log_interval={log_interval}", f"--device={cfg['device']}", f"--dtype={cfg['dtype']}",
        f"--compile={cfg['compile']}",
        "--decay_embeddings=False",  # the Sophia authors' weight decay, for every method (logs/README.md: why)
        f"--init_from={'resume' if resume else 'scratch'}",
    ]


def finished(out_dir, iters):
    """Whether the run's log holds its last evaluation, or the run diverged."""
    if diverged(out_dir):
        return True
    return any(e.get("event") == "eval" and e.get("iter") == iters for e in read_events(out_dir))


def diverged(out_dir):
    return os.path.isfile(os.path.join(out_dir, DIVERGED))


def run_one(cfg, batch, method, rho, lr, seed):
    """Run (or finish) one training run; returns its out_dir.

    The wall-clock guard (run_timeout_minutes) stops a run that overruns with SIGTERM (train.py then
    saves a checkpoint) and stops the experiment: rerunning the command resumes it. It never
    shortens a run, as train.py's --max_minutes would (that one fixes the horizon from the measured
    step time, so the runs of one grid would differ in horizon)."""
    out_dir = run_dir(cfg, batch, method, rho, lr, seed)
    iters = schedule(cfg, batch)[0]
    if finished(out_dir, iters):
        return out_dir
    checkpoint = os.path.join(out_dir, "ckpt.pt")
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads_per_run"]), PYTHONUNBUFFERED="1")
    command = train_command(cfg, batch, method, rho, lr, seed, out_dir, os.path.isfile(checkpoint))
    timeout = cfg["run_timeout_minutes"] * 60 or None
    with open(os.path.join(out_dir, "train.log"), "a", encoding="utf-8") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            status = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            process.wait()
            raise UserError(f"run {out_dir} passed --run_timeout_minutes={cfg['run_timeout_minutes']:g} and was stopped "
                            f"with a checkpoint; rerun the same command to resume it, or lower --tokens_per_run") from None
    if status != 0 and "non-finite loss or gradient" in tail(os.path.join(out_dir, "train.log")):
        open(os.path.join(out_dir, DIVERGED), "w").close()  # a sweep point like any other: its score is inf
    elif status != 0 or not finished(out_dir, iters):
        raise RuntimeError(f"run {out_dir} failed (exit {status}); see {out_dir}/train.log")
    if os.path.isfile(checkpoint):
        os.remove(checkpoint)  # tens of MB each; the log is what the comparison needs
    print(f"finished {out_dir}" + (" (diverged)" if diverged(out_dir) else ""), flush=True)
    return out_dir


def tail(path, size=4000):
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - size))
        return f.read().decode("utf-8", errors="replace")


def run_all(cfg, jobs):
    """Run (batch, method, rho, lr, seed) jobs, `workers` at a time."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=cfg["workers"]) as pool:
        for future in [pool.submit(run_one, cfg, *job) for job in jobs]:
            future.result()


def final_bpc(cfg, batch, method, rho, lr, seed):
    """The run's last val bits per character; inf if it diverged (or its last evaluation was not finite)."""
    out_dir = run_dir(cfg, batch, method, rho, lr, seed)
    if diverged(out_dir):
        return math.inf
    evals = [e for e in read_events(out_dir) if e.get("event") == "eval"]
    value = evals[-1]["val_bpc"]
    return value if math.isfinite(value) else math.inf


# -- the sweep -------------------------------------------------------------------------------------

def initial_grids(cfg):
    """{(method, rho): [learning rates]}; rho is None except for SophiaG (k=10)'s rows."""
    grids = {}
    for method, spec in METHODS.items():
        grid = cfg[spec["grid"]]
        rows = grid.items() if isinstance(grid, dict) else [(None, grid)]
        for rho, lrs in rows:
            grids[(method, None if rho is None else float(rho))] = sorted(float(lr) for lr in lrs)
    return grids


def sweep(cfg):
    """{batch: dict(grids={(method, rho): lrs}, winners={method: (rho, lr)}, scores={(method, rho, lr):
    final val bits/char})}, on sweep_seed. The batch sizes are swept independently, but their runs
    share the workers; each round runs what the last extension added."""
    grids = {batch: initial_grids(cfg) for batch in cfg["batch_sizes"]}
    scores = {batch: {} for batch in cfg["batch_sizes"]}
    growing = list(cfg["batch_sizes"])
    for extensions in range(cfg["max_extensions"] + 1):
        jobs = [(batch, m, rho, lr, cfg["sweep_seed"]) for batch in growing for (m, rho), lrs in grids[batch].items()
                for lr in lrs if (m, rho, lr) not in scores[batch]]
        run_all(cfg, jobs)
        for batch, m, rho, lr, seed in jobs:
            scores[batch][(m, rho, lr)] = final_bpc(cfg, batch, m, rho, lr, seed)
        if extensions == cfg["max_extensions"]:
            break
        growing = [batch for batch in growing if extend(grids[batch], scores[batch])]
        if not growing:
            break
    results = {}
    for batch in cfg["batch_sizes"]:
        winners = {}
        for method in METHODS:
            rho, lr, score = best_point(grids[batch], scores[batch], method)
            if not math.isfinite(score):
                raise RuntimeError(f"every sweep run of {method} at batch {batch} diverged; lower --{METHODS[method]['grid']}")
            winners[method] = (rho, lr)
        results[batch] = dict(grids=grids[batch], winners=winners, scores=scores[batch])
    return results


def main():
    cfg = config_from(sys.argv[1:])
    try:
        os.makedirs(cfg["out"], exist_ok=True)
    except OSError as e:  # a file on the way
        raise UserError(f"cannot make --out={cfg['out']}: {e.strerror or e}") from None
    try:
        compare(cfg)
    except BaseException:  # Ctrl-C included
        if makes_its_out(cfg, sys.argv[1:]):
            shutil.rmtree(cfg["out"], ignore_errors=True)  # a dry run's temp folder, unfinished: nothing to keep
        raise


def compare(cfg):
    """The sweep, the finals and the report, into --out."""
    started = time.time()
    results = sweep(cfg)
    for batch, result in results.items():
        print(f"batch {batch}: winners {result['winners']}", flush=True)
    print(f"sweep done in {(time.time() - started) / 60:.1f} min", flush=True)
    finals = [(batch, m, rho, lr, seed) for batch, result in results.items()
              for m, (rho, lr) in result["winners"].items() for seed in cfg["seeds"]]
    run_all(cfg, finals)
    broken = [run_dir(cfg, *job) for job in finals if diverged(run_dir(cfg, *job))]
    if broken:  # its last evaluation would pass for a result: say so instead
        raise RuntimeError(f"final runs diverged at their sweep's winner: {', '.join(broken)}; the table is not written")
    from logs import compare_report  # matplotlib and the table: only once every run is done

    compare_report.write_all(cfg, results, sys.argv[1:])


if __name__ == "__main__":
    run(main)

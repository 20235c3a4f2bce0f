"""The results of logs/compare_optimizers.py: the table per batch size, the words around it (chosen
by the numbers: nothing typed in) and the plots, into `out`/results.md beside them, which names its
command. Called by compare_optimizers.main once every run has finished."""
import json
import math
import os
import sys

import numpy as np

from opengpt.files import write_atomically, write_text
from logs.compare_grids import on_edge, rhos_of
from logs.compare_optimizers import BASELINE, METHODS, RHO_SEARCHED, run_dir, schedule, tokens_per_step
from logs.plot_loss import load_run
from opengpt.run_log import read_events

WIN_RATE_ADVISED = (0.1, 0.5)  # the Sophia authors' advice for win_rate


def reach(xs, ys, target):
    """The first x at which the curve ys(xs) reaches target (ys <= target), interpolated linearly
    between points; None if it never does."""
    for i in range(len(xs)):
        if ys[i] <= target:
            if i == 0:
                return float(xs[0])
            fraction = (ys[i - 1] - target) / (ys[i - 1] - ys[i])
            return float(xs[i - 1] + fraction * (xs[i] - xs[i - 1]))
    return None


def win_rate_trace(out_dir):
    """(steps, win_rate) of the train events that logged one."""
    events = [e for e in read_events(out_dir) if e.get("event") == "train" and "win_rate" in e]
    return np.array([e["iter"] for e in events]), np.array([e["win_rate"] for e in events])


def wall_seconds(out_dir):
    """First to last event of the run's log (a resumed run's downtime included)."""
    events = read_events(out_dir)
    return events[-1]["time"] - events[0]["time"]


def final_seeds(cfg, batch, winners):
    """{method: dict of per-seed numbers, in cfg["seeds"] order} at one batch size."""
    rows = {}
    for method, (rho, lr) in winners.items():
        dirs = [run_dir(cfg, batch, method, rho, lr, seed) for seed in cfg["seeds"]]
        curves = [load_run(d, y="bpc").val for d in dirs]
        evals = [[e for e in read_events(d) if e.get("event") == "eval"][-1] for d in dirs]
        traces = [win_rate_trace(d) for d in dirs]
        rows[method] = dict(rho=rho, lr=lr, dirs=dirs, curves=curves, bpc=np.array([c.loss[-1] for c in curves]),
                            loss=np.array([e["val_loss"] for e in evals]), seconds=np.array([wall_seconds(d) for d in dirs]),
                            win_rate=[t[1][-1] if t[1].size else None for t in traces], traces=traces)
    target = float(rows[BASELINE]["bpc"].mean())
    for row in rows.values():
        row["delta"] = row["bpc"] - rows[BASELINE]["bpc"]  # same seed = same batches: paired
        row["steps_to_target"] = [reach(c.steps, c.loss, target) for c in row["curves"]]
        row["seconds_to_target"] = [reach(c.seconds, c.loss, target) for c in row["curves"]]
    return rows, target


def mean_sd(values, digits=3, signed=False):
    values = np.asarray(values, dtype=float)
    sd = values.std(ddof=1) if values.size > 1 else float("nan")
    sign = "+" if signed else ""
    return f"{values.mean():{sign}.{digits}f} ± {sd:.{digits}f}" if values.size > 1 else f"{values.mean():{sign}.{digits}f}"


def reached_text(values, digits=0):
    if any(v is None for v in values):
        return f"not reached ({sum(v is None for v in values)}/{len(values)} seeds)"
    return f"{np.mean(values):.{digits}f}"


def grid_text(grids, winners, method):
    rho_win, lr_win = winners[method]
    parts = []
    for rho in rhos_of(grids, method) or [None]:
        lrs = ", ".join(f"**{lr:g}**" if (rho, lr) == (rho_win, lr_win) else f"{lr:g}" for lr in grids[(method, rho)])
        parts.append(lrs if rho is None else f"ρ {rho:g}: {lrs}")
    return "; ".join(parts)


def sweep_table(grids, scores, method):
    """The sweep's final val bits/char of one method, lr -> value, a row per rho."""
    lines = []
    for rho in rhos_of(grids, method) or [None]:
        values = ", ".join(f"{lr:g}: {'diverged' if math.isinf(scores[(method, rho, lr)]) else f'{scores[(method, rho, lr)]:.3f}'}"
                           for lr in grids[(method, rho)])
        lines.append(f"{method}{'' if rho is None else f', ρ {rho:g}'}: {values}")
    return lines


def verdict(delta):
    """How a method's per-seed bits/char differences from AdamW read."""
    if np.all(delta < 0):
        return "better than AdamW on every seed"
    if np.all(delta > 0):
        return "worse than AdamW on every seed"
    return "within seed noise of AdamW (the seeds disagree in sign)"


def gap_trend(gap_small, gap_large):
    """How SophiaG's mean gap to AdamW (bits/char, negative = ahead) moves from the small batch to the large."""
    if gap_small > 0 >= gap_large:
        return "reverses: SophiaG is behind AdamW at the small batch and level or ahead at the large one"
    if gap_small < 0 <= gap_large:
        return "reverses: SophiaG is ahead of AdamW at the small batch and level or behind at the large one"
    if gap_small >= 0:
        return "narrows with the larger batch" if gap_large < gap_small else "does not narrow with the larger batch"
    return "grows in SophiaG's favour with the larger batch" if gap_large < gap_small else "shrinks with the larger batch"


def batch_section(cfg, batch, result, rows, target):
    tokens = tokens_per_step(cfg, batch)
    iters, warmup, eval_interval, _ = schedule(cfg, batch)
    grids, winners = result["grids"], result["winners"]
    lines = [f"### {batch} x {cfg['block_size']} = {tokens:,} tokens per step ({iters} steps, warmup {warmup})", "",
             "| method | lr (ρ) | sweep (winner bold) | val bits/char | Δ vs AdamW per seed | Δ mean ± sd | val loss | "
             "steps to AdamW's bits/char | seconds to it | final win_rate | seconds per run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, row in rows.items():
        rho, lr = row["rho"], row["lr"]
        edge = " (inconclusive: on the grid's edge)" if on_edge(grids, method, rho, lr) else ""
        chosen = f"{lr:g}" + (f" (ρ {rho:g})" if rho is not None else "") + edge
        per_seed = ", ".join(f"{d:+.3f}" for d in row["delta"]) if method != BASELINE else "—"
        delta = mean_sd(row["delta"], signed=True) if method != BASELINE else "—"
        rates = [w for w in row["win_rate"] if w is not None]
        win = f"{np.mean(rates):.3f}" if rates else "—"
        lines.append(f"| {method} | {chosen} | {grid_text(grids, winners, method)} | {mean_sd(row['bpc'])} | {per_seed} | {delta} | "
                     f"{mean_sd(row['loss'])} | {reached_text(row['steps_to_target'])} | {reached_text(row['seconds_to_target'])} | "
                     f"{win} | {np.mean(row['seconds']):.0f} s |")
    lines += ["", f"Sweep on seed {cfg['sweep_seed']} (final val bits/char per learning rate):", ""]
    lines += [f"- {line}" for method in METHODS for line in sweep_table(grids, result["scores"], method)]
    lines += ["", f"AdamW's mean final val bits/char, the target of the \"to AdamW's\" columns: {target:.3f} "
                  f"(interpolated between the evaluations every {eval_interval} steps)."]
    return lines


def findings(cfg, results, tables):
    """Plain words chosen by the numbers: {batch: (rows, target)} -> lines."""
    lines = []
    sophia_by_batch = {}
    for batch, (rows, _) in tables.items():
        tokens = tokens_per_step(cfg, batch)
        best = min(rows, key=lambda m: rows[m]["bpc"].mean())
        sophia = rows[RHO_SEARCHED]
        sophia_by_batch[tokens] = sophia["delta"].mean()
        rates = [w for w in sophia["win_rate"] if w is not None]
        low, high = WIN_RATE_ADVISED
        rate_words = "no win_rate was logged"
        if rates:
            inside = low <= np.mean(rates) <= high
            rate_words = (f"its final win_rate is {np.mean(rates):.3f}, " +
                          ("inside" if inside else "outside") + f" the authors' advised {low}–{high}")
        steps = sophia["steps_to_target"]
        speed = ("it reaches AdamW's final bits/char at step "
                 f"{np.mean(steps):.0f} of {schedule(cfg, batch)[0]} ({schedule(cfg, batch)[0] / np.mean(steps):.2f}x fewer steps)"
                 if all(s is not None for s in steps) else "it does not reach AdamW's final bits/char on every seed")
        lines.append(f"- At {tokens:,} tokens per step the lowest val bits/char is {best}'s ({rows[best]['bpc'].mean():.3f}). "
                     f"SophiaG (k=10) is {verdict(sophia['delta'])} (Δ {mean_sd(sophia['delta'], signed=True)} bits/char); "
                     f"{rate_words}; {speed}. Sign momentum (k=0) is {verdict(rows['SophiaG (k=0, sign momentum)']['delta'])}, "
                     f"Muon {verdict(rows['Muon']['delta'])}.")
    if len(sophia_by_batch) > 1:
        (small, gap_small), (large, gap_large) = sorted(sophia_by_batch.items())[0], sorted(sophia_by_batch.items())[-1]
        trend = gap_trend(gap_small, gap_large)
        lines.append(f"- The batch-size question: SophiaG's mean gap to AdamW goes from {gap_small:+.3f} bits/char at "
                     f"{small:,} tokens per step to {gap_large:+.3f} at {large:,}: it {trend}.")
    edges = {b: [m for m, (rho, lr) in result["winners"].items() if on_edge(result["grids"], m, rho, lr)]
             for b, result in results.items()}
    if any(edges.values()):
        where = "; ".join(f"at {tokens_per_step(cfg, b):,} tokens per step {', '.join(ms)}" for b, ms in edges.items() if ms)
        lines.append(f"- Inconclusive, their winner on an edge of the grid after {cfg['max_extensions']} extensions (a wider "
                     f"sweep, --max_extensions, may find a better one): {where}.")
    all_steps = [rows[RHO_SEARCHED]["steps_to_target"] for rows, _ in tables.values()]
    two_x = any(all(s is not None and schedule(cfg, b)[0] / s >= 2 for s in steps)
                for b, steps in zip(tables, all_steps))
    lines.append("- " + ("SophiaG reached AdamW's final bits/char in half the steps or fewer at some batch size here, as the "
                         "paper reports at GPT-2 scale." if two_x else
                         "We could not reproduce the paper's 2x fewer steps at this scale."))
    return lines


LITERATURE = [
    "- Liu et al. 2023, *Sophia* (arXiv 2305.14342): a 2x speed-up over Adam in steps, total compute and wall-clock "
    "time on GPT-2 125M–770M (OpenWebText, batch size 480, the Hessian estimated every 10 steps).",
    "- Kaddour et al. 2023, *No Train No Gain* (NeurIPS 2023): pre-training BERT and T5 on a fixed compute budget, the "
    "gains of Lion and Sophia vanish against an AdamW baseline whose learning rate decays fully.",
    "- Zhao et al. 2024, *Deconstructing What Makes a Good Optimizer for Language Models* (arXiv 2407.07972): tuned, "
    "Adam, Adafactor, Lion and Sophia perform comparably (SGD excepted), on models of 150M–1.2B parameters, and signed "
    "momentum (Signum) recovers Adam's performance and its stability across learning rates.",
    "- Wen et al. 2025, *Fantastic Pretraining Optimizers and Where to Find Them* (arXiv 2509.02046): with every "
    "optimizer tuned and compared at the end of training (ten optimizers, 0.1B–1.2B parameters), the speed-up over AdamW "
    "is lower than the claimed 1.4–2x and decreases with model size, to 1.1x at 1.2B; the fastest (Muon, Soap) use "
    "matrices as preconditioners: 1.4x at 0.1B.",
]


def protocol_text(cfg, command):
    with open(os.path.join(cfg["data_dir"], "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    val = meta["splits"]["val"]
    return (f"GPT of {cfg['n_layer']} layers, {cfg['n_head']} heads, {cfg['n_embd']} wide, block {cfg['block_size']}, no bias, "
            f"dropout 0, on {os.path.basename(os.path.normpath(cfg['data_dir']))} ({meta['vocab_size']:,}-token vocabulary), "
            f"device {cfg['device']}, dtype {cfg['dtype']}. Every run sees {cfg['tokens_per_run']:,} tokens: warmup "
            f"{cfg['warmup_fraction']:.0%} of the steps, cosine to lr × {cfg['min_lr_ratio']:g} at the last step, val bits per "
            f"character over the whole val split ({val['documents']} documents, {val['characters']:,} characters) at "
            f"{cfg['evals_per_run']} points and the end; no weight decay on the embeddings for any method. The learning rate "
            f"(and SophiaG's ρ) of each method is the lowest final val bits/char of a sweep on seed {cfg['sweep_seed']} at the "
            f"same horizon, grids on an edge extended by 2x up to {cfg['max_extensions']} times; then seeds "
            f"{', '.join(map(str, cfg['seeds']))} at the winner, the same batches for every method (Δ is paired by seed; "
            f"negative = fewer bits than AdamW). Command: `{command}`.")


def plot_batch(cfg, batch, rows, result, path):
    """Val bits/char vs step per method (thin seed lines, thick mean) and SophiaG's win_rate: the
    winner's seeds, and dashed the sweep run of each rho at its best lr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_rate) = plt.subplots(1, 2, figsize=(13, 5))
    iters = schedule(cfg, batch)[0]
    lows, highs = [], []
    for index, (method, row) in enumerate(rows.items()):
        color = f"C{index}"
        for curve in row["curves"]:
            ax.plot(curve.steps, curve.loss, color=color, linewidth=0.6, alpha=0.5)
        steps = row["curves"][0].steps
        mean = np.mean([c.loss for c in row["curves"]], axis=0)
        ax.plot(steps, mean, color=color, linewidth=2, label=f"{method} (lr {row['lr']:g})")
        lows.append(min(c.loss.min() for c in row["curves"]))
        later = [c.loss[c.steps >= 0.25 * iters] for c in row["curves"]]  # the y range starts a quarter in
        highs.append(max(v[0] for v in later if v.size))
        if method == RHO_SEARCHED:
            for seed_index, (steps_, rates) in enumerate(row["traces"]):
                ax_rate.plot(steps_, rates, color=color, linewidth=1.5,
                             label=f"the winner's seeds (ρ {row['rho']:g}, lr {row['lr']:g})" if seed_index == 0 else None)
    margin = 0.1 * (max(highs) - min(lows)) or 0.05
    ax.set_ylim(min(lows) - margin, max(highs) + margin)
    ax.set(xlabel="optimizer step", ylabel="val bits per character", title="val bits/char (thin: seeds, thick: mean)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    grids, scores = result["grids"], result["scores"]
    for shade, rho in enumerate(rhos_of(grids, RHO_SEARCHED)):
        lr = min(grids[(RHO_SEARCHED, rho)], key=lambda v: scores[(RHO_SEARCHED, rho, v)])
        steps_, rates = win_rate_trace(run_dir(cfg, batch, RHO_SEARCHED, rho, lr, cfg["sweep_seed"]))
        ax_rate.plot(steps_, rates, linestyle="--", linewidth=1, color=f"C{shade + 4}", label=f"ρ {rho:g}, lr {lr:g} (sweep)")
    ax_rate.axhspan(*WIN_RATE_ADVISED, color="gray", alpha=0.15, label="the authors' advice")
    ax_rate.set_yscale("symlog", linthresh=1e-3)  # 0.001 and 0.1 both readable; 0 before the first estimate
    ax_rate.set(xlabel="optimizer step", ylabel="win_rate (share not clipped)", ylim=(0, 1),
                title="SophiaG (k=10) win_rate")
    ax_rate.legend(fontsize=8)
    ax_rate.grid(alpha=0.3)
    fig.suptitle(f"{batch} x {cfg['block_size']} = {tokens_per_step(cfg, batch):,} tokens per step")
    fig.tight_layout()
    write_atomically(path, lambda temp: fig.savefig(temp, format="png", dpi=110))
    plt.close(fig)


def plot_gap(cfg, tables, path):
    """Each method's gap to AdamW (mean ± sd over seeds) against tokens per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    batches = sorted(tables)
    x = [tokens_per_step(cfg, b) for b in batches]
    for index, method in enumerate(METHODS):
        deltas = [tables[b][0][method]["delta"] for b in batches]
        sd = [d.std(ddof=1) if d.size > 1 else 0.0 for d in deltas]
        ax.errorbar(x, [d.mean() for d in deltas], yerr=sd, color=f"C{index}", marker="o", capsize=3, label=method)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set(xlabel="tokens per step (same tokens per run)", ylabel="val bits/char minus AdamW's (seed-paired)",
           title="Gap to AdamW against batch size (below 0: better than AdamW)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    write_atomically(path, lambda temp: fig.savefig(temp, format="png", dpi=110))
    plt.close(fig)


def write_all(cfg, results, argv):
    """results.md and its plots."""
    tables = {batch: final_seeds(cfg, batch, result["winners"]) for batch, result in results.items()}
    command = " ".join(["python -m logs.compare_optimizers", *argv])
    images = {batch: f"val_bpc_{tokens_per_step(cfg, batch)}_tokens.png" for batch in results}
    for batch, (rows, _) in tables.items():
        plot_batch(cfg, batch, rows, results[batch], os.path.join(cfg["out"], images[batch]))
    plot_gap(cfg, tables, os.path.join(cfg["out"], "gap_vs_batch.png"))
    finals = [d for rows, _ in tables.values() for row in rows.values() for d in row["dirs"]]
    sweeps = [run_dir(cfg, batch, m, rho, lr, cfg["sweep_seed"]) for batch, result in results.items()
              for m, rho, lr in result["scores"]]
    logs = [read_events(d) for d in finals + sweeps]
    span = max(events[-1]["time"] for events in logs) - min(events[0]["time"] for events in logs)
    first = next(e for e in read_events(finals[0]) if e.get("event") == "config")
    machine = first.get("machine") or "an unrecorded machine"
    lines = [protocol_text(cfg, command), ""]
    for batch, result in results.items():
        lines += batch_section(cfg, batch, result, *tables[batch]) + [""]
    lines += ["What it says:", ""] + findings(cfg, results, tables) + ["", "The literature, beside it:", ""] + LITERATURE + [""]
    lines += [f"Machine: {machine}, torch {first.get('torch')}; {cfg['workers']} runs at a time, {cfg['threads_per_run']} "
              f"thread(s) each. The {len(sweeps)} sweep runs and {len(finals)} final runs took {span / 60:.0f} minutes from the "
              f"first run's start to the last one's end (a run's seconds count from its training loop's start).", ""]
    # links relative to results.md, which sits beside its plots
    lines += [f"![val bits/char, {b} x {cfg['block_size']}]({images[b]})" for b in results]
    lines += ["![gap to AdamW against batch size](gap_vs_batch.png)", ""]
    text = "\n".join(lines)
    write_text(os.path.join(cfg["out"], "results.md"), text)
    print(text)
    print(f"wrote {cfg['out']}/results.md and its plots", file=sys.stderr)

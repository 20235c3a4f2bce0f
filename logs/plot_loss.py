"""Plot the loss curves of training runs: one line per optimizer, the seeds of each as a band.

    python -m logs.plot_loss out-adamw-s1 out-adamw-s2 out-sophiag-s1 out-sophiag-s2 --out=logs/loss.png
    python -m logs.plot_loss adam.log sophia.log --label=adam.log=AdamW --label=sophia.log=SophiaG

Each RUN is a metrics.jsonl written by train.py, a run folder (out_dir) holding one, or a classic
text log as nanoGPT and the Sophia project print: `iter 120: loss 3.4521, time 35.20ms, mfu 12.34%`
and `step 100: train loss 3.2000, val loss 3.3000`.

Runs are grouped into one line per label: the --label given for the run; else the optimizer in
its config, SophiaG with its hess_interval k (k=0 never estimates the Hessian: sign momentum, a
different method); else the file name (a text log records no config). The runs of a group, usually
seeds, are drawn as their mean with a band from the lowest to the highest run, at the steps that
all of them logged.

Four panels: train loss (the batch loss train.py logs every log_interval steps) and val loss
against the optimizer step, and the same against wall-clock seconds. The clock of a metrics.jsonl
run starts at its config event, written just before the training loop (model building is not
counted; the step-0 evaluation, later evaluations and Hessian estimates are); a resumed run's
downtime and the steps it redid are left out. Text logs carry no clock times, so they appear in the
step panels only: summing their `time Yms` fields would leave out evaluation time, a different
quantity from the JSON runs' clock.
"""
import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from functools import reduce

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run by path (python logs/X.py) as well as python -m logs.X
from opengpt.cli import UserError, run
from opengpt.files import write_atomically
from opengpt.optimizers import REGISTRY

# Config keys that do not change what a run computes: runs differing only in these are seeds of
# one experiment. A group whose runs differ in any other key gets a note.
NOT_THE_EXPERIMENT = {"seed", "out_dir", "init_from", "wandb_log", "wandb_project", "wandb_run_name",
                      "tensorboard_log", "always_save_checkpoint", "ckpt_interval", "keep_best_checkpoint"}
NUMBER = r"([-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf))"
TRAIN_LINE = re.compile(rf"\biter (\d+): loss {NUMBER}")
EVAL_LINE = re.compile(rf"\bstep (\d+): train loss {NUMBER}, val loss {NUMBER}")


@dataclass
class Curve:
    steps: np.ndarray  # optimizer steps, increasing
    loss: np.ndarray  # nats/token at each step
    seconds: np.ndarray | None  # wall-clock seconds at each step; None when the log has no clock


@dataclass
class Run:
    path: str
    train: Curve
    val: Curve
    config: dict  # empty for a text log
    machine: str | None  # what the run was timed on, when its log says


@dataclass
class Band:
    """A group's runs at the steps all of them logged: mean, lowest and highest loss."""
    steps: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    seconds: np.ndarray | None  # mean wall-clock seconds at each step; None if any run has no clock
    runs: int


def curve_from(points, with_clock):
    """A Curve from {step: (loss, seconds)}."""
    steps = sorted(points)
    loss = np.array([points[s][0] for s in steps], dtype=float)
    seconds = np.array([points[s][1] for s in steps], dtype=float) if with_clock else None
    return Curve(np.array(steps, dtype=int), loss, seconds)


def parse_metrics_jsonl(path, y="loss"):
    """A Run from train.py's metrics.jsonl. A resumed run appends to the same file: the steps it
    redid replace the first attempt's, and its clock continues where the kept records end.
    y="bpc": bits per character instead of the loss; the train curve is then the evaluations' train
    split (training steps log only the loss of their batch)."""
    config, machine = {}, None
    points = {"train": {}, "eval": {}}  # event kind -> {step: (loss, seconds)}
    clock_start, new_process, offset = None, True, 0.0
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                kind = record.get("event")
                if kind == "config":  # written by each process, before its training loop
                    config, machine = record.get("config", {}), record.get("machine", machine)
                    clock_start, new_process = record.get("time"), True
                    continue
                if y == "bpc" and kind == "eval" and "val_bpc" in record:  # one evaluation gives both curves
                    extra = ("train", float(record["train_bpc"]))
                elif y == "bpc" or kind not in points:
                    continue
                else:
                    extra = None
                step, event_time = int(record["iter"]), float(record["time"])
                loss = float(record["val_bpc"] if y == "bpc" else record["loss"] if kind == "train" else record["val_loss"])
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number} is not valid JSON ({e.msg})") from None
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise UserError(f"{path}:{number} is not a train.py event ({type(e).__name__}: {e})") from None
            if new_process:  # a resumed process redoes the steps after its checkpoint
                for table in points.values():
                    for redone in [s for s in table if s >= step]:
                        del table[redone]
                offset = max((seconds for table in points.values() for _, seconds in table.values()), default=0.0)
                clock_start = event_time if clock_start is None else clock_start  # no config event: start here
                new_process = False
            points[kind][step] = (loss, offset + event_time - clock_start)
            if extra:
                points[extra[0]][step] = (extra[1], offset + event_time - clock_start)
    return Run(path, curve_from(points["train"], True), curve_from(points["eval"], True), config, machine)


def parse_text_log(path):
    """A Run from a classic text log; later lines for the same step replace earlier ones."""
    train, val = {}, {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if match := TRAIN_LINE.search(line):
                train[int(match[1])] = (float(match[2]), None)
            elif match := EVAL_LINE.search(line):
                val[int(match[1])] = (float(match[3]), None)
    return Run(path, curve_from(train, False), curve_from(val, False), {}, None)


def load_run(path, y="loss"):
    """A Run from a metrics.jsonl, a run folder or a text log; UserError if there is none."""
    if os.path.isdir(path):
        jsonl = os.path.join(path, "metrics.jsonl")
        if not os.path.isfile(jsonl):
            raise UserError(f"folder {path} has no metrics.jsonl; give a run's out_dir, its metrics.jsonl or a text log")
        path = jsonl
    elif not os.path.isfile(path):
        raise UserError(f"{path} not found")
    if y == "bpc" and not path.endswith(".jsonl"):
        raise UserError(f"{path}: bits per character need train.py's metrics.jsonl; a text log has only losses")
    run = parse_metrics_jsonl(path, y) if path.endswith(".jsonl") else parse_text_log(path)
    if y == "bpc" and run.val.steps.size == 0:
        raise UserError(f"{path} has no bits per character: its evaluations predate them; plot the loss instead")
    if run.train.steps.size == 0 and run.val.steps.size == 0:
        raise UserError(f"{path} has no loss lines: expected train.py's metrics.jsonl events or text lines like "
                        f"'iter 10: loss 3.45' and 'step 100: train loss 3.2, val loss 3.3'")
    return run


def group_name(run):
    """The line a run belongs to when no --label names it."""
    optimizer = run.config.get("optimizer")
    if optimizer in REGISTRY:
        return REGISTRY[optimizer].run_label(run.config)
    if optimizer:
        return optimizer
    name = os.path.basename(os.path.normpath(run.path))
    if name == "metrics.jsonl":  # a config-less metrics.jsonl: name it by its folder
        name = os.path.basename(os.path.dirname(os.path.abspath(run.path)))
    return os.path.splitext(name)[0]


def group_runs(labelled_runs):
    """{name: [runs]} from (label or None, run) pairs, in the order the names first appear."""
    groups = {}
    for label, run in labelled_runs:
        groups.setdefault(label or group_name(run), []).append(run)
    return groups


def config_differences(runs):
    """The config keys, other than seeds and output settings, in which the runs differ."""
    keys = set().union(*(run.config for run in runs)) - NOT_THE_EXPERIMENT
    return sorted(k for k in keys if len({repr(run.config.get(k)) for run in runs}) > 1)


def group_notes(name, runs):
    """What the reader of the plot should know about a group: runs that are not seeds of one
    experiment, and points left out of its band."""
    differences = config_differences(runs)
    if differences:
        yield f"the runs of {name} differ in {', '.join(differences)}, not only the seed; use --label to draw them apart"
    for split in ("train", "val"):
        curves = [getattr(run, split) for run in runs]
        left_out = sum(c.steps.size for c in curves) - len(curves) * band(curves).steps.size
        if left_out:
            yield f"{name}: {left_out} {split} points at steps that not all its runs logged are left out"


def band(curves):
    """Mean, min and max over the curves at the steps all of them logged."""
    steps = reduce(np.intersect1d, [c.steps for c in curves])
    losses = np.stack([c.loss[np.searchsorted(c.steps, steps)] for c in curves])
    seconds = None
    if all(c.seconds is not None for c in curves):
        seconds = np.stack([c.seconds[np.searchsorted(c.steps, steps)] for c in curves]).mean(axis=0)
    return Band(steps, losses.mean(axis=0), losses.min(axis=0), losses.max(axis=0), seconds, len(curves))


def clock_label(runs):
    """The x label of the wall-clock panels, naming the machine(s) when the logs record them."""
    machines = sorted({run.machine or "an unrecorded machine" for run in runs if run.train.seconds is not None})
    if not machines or machines == ["an unrecorded machine"]:
        return "wall-clock seconds (machine not recorded)"
    if len(machines) == 1:
        return f"wall-clock seconds on {machines[0]}"
    return f"wall-clock seconds on {' / '.join(machines)} (different machines)"


def plot(groups, out_path, y="loss"):
    """Draw the four panels for {name: [runs]} and write them to out_path."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib (it is in requirements.txt)") from None
    matplotlib.use("Agg")  # no display needed: the figure only goes to a file
    import matplotlib.pyplot as plt

    file_format = os.path.splitext(out_path)[1].lstrip(".").lower() or "png"
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    if file_format not in fig.canvas.get_supported_filetypes():
        raise UserError(f"--out={out_path}: matplotlib cannot write .{file_format} files; use .png, .pdf or .svg")
    all_runs = [run for runs in groups.values() for run in runs]
    panels = {(0, 0): ("train", "steps"), (0, 1): ("val", "steps"), (1, 0): ("train", "seconds"), (1, 1): ("val", "seconds")}
    for (row, col), (split, axis) in panels.items():
        ax = axes[row, col]
        drawn = False
        for index, (name, runs) in enumerate(groups.items()):
            color = f"C{index}"  # the same colour for a group in every panel
            b = band([getattr(run, split) for run in runs])
            x = b.steps if axis == "steps" else b.seconds
            if x is None or x.size == 0:
                continue
            label = f"{name} ({b.runs} runs)" if b.runs > 1 else f"{name} (1 run)"
            ax.plot(x, b.mean, color=color, label=label, linewidth=1.5)
            if b.runs > 1:
                ax.fill_between(x, b.low, b.high, color=color, alpha=0.2, linewidth=0)
            drawn = True
        if drawn:
            ax.legend(fontsize=8)
        else:
            why = "no wall-clock times in these logs (text logs record none)" if axis == "seconds" else f"no {split} loss in these logs"
            ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_xlabel("optimizer step" if axis == "steps" else clock_label(all_runs))
        ax.set_ylabel(f"{split} bits per character" if y == "bpc" else f"{split} loss (nats/token)")
        ax.set_title(f"{split} loss" + (" (the batch at each logged step)" if split == "train" else ""), fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle("Loss per optimizer: line = mean over a group's runs (seeds), band = min..max over them")
    fig.tight_layout()
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        write_atomically(out_path, lambda temp_path: fig.savefig(temp_path, format=file_format, dpi=120))
    except OSError as e:  # a file where a folder should be, a folder of that name, no permission
        raise UserError(f"cannot write --out={out_path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)


def parse_labels(label_args, run_paths):
    """{run path: name} from --label RUN=NAME arguments; each RUN must be one of the runs given."""
    labels = {}
    for arg in label_args:
        path, sep, name = arg.partition("=")
        if not sep or not path or not name:
            raise UserError(f"--label={arg}: write it as --label=RUN=NAME, RUN being one of the runs given")
        if path not in run_paths:
            raise UserError(f"--label={arg}: {path} is not one of the runs given ({', '.join(run_paths)})")
        labels[path] = name
    return labels


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, like every other mistake
        raise UserError(f"{message} (see --help)")


def main():
    parser = ArgumentParser(description="Plot loss curves: one line per optimizer, seeds as a min..max band.")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="a metrics.jsonl, a run folder holding one, or a text log")
    parser.add_argument("--out", default="logs/loss.png", help="image to write (.png, .pdf, .svg); default logs/loss.png")
    parser.add_argument("--y", choices=("loss", "bpc"), default="loss",
                        help="loss: nats per token; bpc: bits per character, comparable across tokenizers")
    parser.add_argument("--label", action="append", default=[], metavar="RUN=NAME",
                        help="draw RUN in the line NAME; runs with the same NAME form one band (repeatable)")
    args = parser.parse_args()
    labels = parse_labels(args.label, args.runs)
    groups = group_runs([(labels.get(path), load_run(path, args.y)) for path in args.runs])
    for name, runs in groups.items():
        for note in group_notes(name, runs):
            print(f"note: {note}", file=sys.stderr)
    plot(groups, args.out, args.y)
    print(f"wrote {args.out}: " + "; ".join(f"{name} ({len(runs)} run{'s' * (len(runs) > 1)})" for name, runs in groups.items()))


if __name__ == "__main__":
    run(main)

"""What a training run reports: text lines on stdout and the same numbers as JSON lines in
out_dir/metrics.jsonl, plus TensorBoard and wandb when asked. Only rank 0 writes."""
import contextlib
import json
import os
import platform
import sys
import time

import torch

from opengpt.cli import UserError
from opengpt.files import space_left


FILENAME = "metrics.jsonl"


class RunLog:
    def __init__(self, config, enabled, machine=None):
        self.enabled = enabled
        self.file = self.tensorboard = self.wandb = None
        self.kept = self.finished = False
        if not enabled:
            return
        os.makedirs(config["out_dir"], exist_ok=True)
        # a resumed run appends to its own log, and so does an evaluation, which must never destroy
        # one; a new run starts a new one (train.py refuses a folder that holds another run's log)
        appending = config["init_from"] == "resume" or config.get("eval_only", False)
        self.path = os.path.join(config["out_dir"], FILENAME)
        if appending:  # a line an earlier process left half written (a full disk, kill -9) would join this run's first
            cut_to_last_line(self.path)
        try:
            self.size_before = os.path.getsize(self.path) if appending and os.path.exists(self.path) else None
            self.file = open(self.path, "a" if appending else "w", encoding="utf-8", buffering=1)
        except OSError as e:
            raise UserError(f"cannot write {self.path}: {e.strerror or e}") from None
        try:
            self.event("config", config=config, machine=machine, argv=sys.argv, python=platform.python_version(),
                       torch=torch.__version__, platform=platform.platform())
        except UserError:  # a full disk: leave no empty log that would turn the rerun away
            self.discard_unless_kept()
            raise
        if config["tensorboard_log"]:
            self.tensorboard = _open_tensorboard(config["out_dir"])
        if config["wandb_log"]:
            self.wandb = _open_wandb(config)

    def text(self, line):
        if self.enabled:
            print(line, flush=True)

    def event(self, kind, **fields):
        """One JSON object per line: {"event": kind, "time": unix seconds, **fields}."""
        if not self.enabled:
            return
        self._write(json.dumps({"event": kind, "time": time.time(), **fields}, ensure_ascii=False) + "\n")
        scalars = {k: v for k, v in fields.items() if isinstance(v, (int, float)) and k != "iter"}
        step = fields.get("iter")
        if step is None or not scalars:
            return
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(f"{kind}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in scalars.items()}, step=step)

    def _write(self, line):
        try:
            self.file.write(line)
        except OSError as e:  # a full disk: stop, rather than train on with no record of it
            try:
                self.file.close()  # closes even though its flush fails again
            except OSError:
                pass
            self.file = None
            cut_to_last_line(self.path)  # the line the disk had no room for, part of it written
            raise UserError(f"could not write {self.path} ({e.strerror or e}, {space_left(self.path)}); "
                            f"free space, then rerun (with --init_from=resume if a checkpoint was saved)") from None

    def keep(self):
        """The run saved a checkpoint: its log stays, however the run ends."""
        self.kept = True

    def discard_unless_kept(self):
        """For a run that ends unfinished (before close()) and saved no checkpoint: take back its lines,
        removing the log it started or cutting the one it appended to back to where it began."""
        if not self.enabled or self.kept or self.finished:
            return
        self.close()
        with contextlib.suppress(OSError):  # gone already, or a file we cannot change: nothing to take back
            if self.size_before is None:
                os.remove(self.path)
            else:
                os.truncate(self.path, self.size_before)

    def close(self):
        self.finished = True
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.tensorboard = self.wandb = None


def cut_to_last_line(path):
    """Truncate a regular file to the end of its last whole line; anything else is left as it is."""
    if not os.path.isfile(path):
        return
    with contextlib.suppress(OSError), open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                f.truncate(start + newline + 1)
                return
            end = start
        f.truncate(0)


def read_events(out_dir):
    """The events of a run's metrics.jsonl, in order; [] before the run has started."""
    path = os.path.join(out_dir, FILENAME)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _open_tensorboard(out_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard_log=True but the tensorboard package is missing (pip install tensorboard); "
              "continuing without it", file=sys.stderr)
        return None
    return SummaryWriter(log_dir=os.path.join(out_dir, "tensorboard"))


def _open_wandb(config):
    try:
        import wandb
    except ImportError:
        print("wandb_log=True but wandb is not installed (pip install wandb); continuing without it; "
              "metrics.jsonl has the same numbers", file=sys.stderr)
        return None
    try:
        return wandb.init(project=config["wandb_project"], name=config["wandb_run_name"], config=config)
    except Exception as e:  # offline, not logged in: the run matters more than the dashboard
        print(f"wandb could not start ({type(e).__name__}: {e}); continuing without it", file=sys.stderr)
        return None

"""What a GPU does with this project, in one command and in under 10 minutes, in a report to commit.

    python gpu_check.py                  # on a CUDA GPU: prints the report and writes logs/gpu_check.txt
    python gpu_check.py --dry_run=True --data_dir=data/zh_default --out=/tmp/gpu_check.txt
                                         # the same steps on the CPU with a tiny model, in seconds (tested)

1. GPT-2 small (124M) at block 1024: bf16 autocast, torch.compile, fused AdamW, flash attention
   (scaled_dot_product_attention): ms per step, tokens/s and MFU against the GPU's datasheet peak
   (target: 45% or more on an H100/H200). The step is bench.py's training case, run as its worker.
2. SophiaG's amortised overhead on the same model and settings: bench.py --section=sophia.
3. The default Chinese recipe for `zh_seconds` of wall-clock: prepare.py, then train.py with
   `zh_config` on the GPU and --max_minutes (the schedule fits the budget, and the run ends with an
   evaluation); should it overrun, SIGTERM stops it (it saves a checkpoint and exits).
4. Sampling, the recipe's model at vocabulary 8,192 and block 256: bench.py --section=sample, without
   the KV cache, with it, and with decode.py's one-token step eager and compiled (torch.compile on a
   GPU), in float32; it says whether every path drew the same tokens (on a CPU they must, and do).
Every part runs in its own process under a time limit; one that fails or runs out of time is
reported as such and the others still run. The report is rewritten after every part, so even an
interrupted check leaves what it measured.
"""
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time

import torch

from opengpt import hardware
from opengpt import run_log
from opengpt.cli import UserError, run
from opengpt.files import write_text
from configurator import parse_args

DEFAULTS = dict(
    device="cuda",
    dry_run=False,  # the CPU, float32, no compile, a tiny model and tiny runs: checks the script, measures nothing
    out="logs/gpu_check.txt",
    batch_size=12,  # GPT-2 small micro-batch: 12 x 1024 tokens, as nanoGPT
    zh_config="config/train_zh_speedrun.py",  # the default recipe (make demo's)
    zh_seconds=120,
    data_dir="",  # empty: run prepare.py and use its default output, data/zh_default
    zh_out_dir="out-gpu-check-zh",
)
GPT2_SMALL = "config/train_gpt2_small_adam.py"
# Time limits in seconds. The compiles take most of the first two parts (the second reuses the first's
# compiled graphs from inductor's cache); with zh_seconds=120 the limits add up to about 9.5 minutes.
LIMITS = dict(train_step=150, sophia=120, prepare=60, zh_startup=25, zh_grace=20, sample=90)
# A model small enough for the dry run to finish in seconds on a CPU. Not the tests' TINY_MODEL_ARGS:
# bench.py takes these too, and the check sets --device and --dtype itself, per part.
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=2"]


class Report:
    """The lines printed so far, also written to a file after every part."""

    def __init__(self, path):
        self.path = path
        self.lines = []
        self.lock = threading.Lock()

    def say(self, line=""):
        with self.lock:
            print(line, flush=True)
            self.lines.append(line)

    def save(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        write_text(self.path, "\n".join(self.lines) + "\n")


def run_part(report, command, limit_s, stop_signal=signal.SIGKILL, stop_when=lambda: True):
    """Run command, its output going into the report as it comes. Past limit_s (and once
    stop_when() says so) the process is sent stop_signal, then killed if it lingers. Returns
    (exit status, whether the limit stopped it, its output lines)."""
    report.say("$ " + shlex.join(command))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
    lines = []

    def pump():
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            report.say(lines[-1])
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    start, stopped = time.monotonic(), False
    while process.poll() is None:
        elapsed = time.monotonic() - start
        if not stopped and elapsed > limit_s and (stop_when() or elapsed > limit_s + LIMITS["zh_grace"]):
            os.killpg(process.pid, stop_signal)
            stopped, stop_time = True, time.monotonic()
        if stopped and time.monotonic() - stop_time > LIMITS["zh_grace"]:
            os.killpg(process.pid, signal.SIGKILL)
        time.sleep(0.2)
    reader.join()
    return process.returncode, stopped, lines


def header(report, cfg, device, dtype):
    report.say(f"# gpu_check.py{' (dry run: CPU, tiny model; measures nothing)' if cfg['dry_run'] else ''}, "
               f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
    report.say(f"code: {commit or 'not a git checkout'}{' (with uncommitted changes)' if dirty.strip() else ''}")
    report.say(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {device}: {hardware.device_name(device)}, dtype {dtype}")
    if device.startswith("cuda"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit", "--format=csv,noheader"]
        smi = subprocess.run(query, capture_output=True, text=True)
        report.say(f"nvidia-smi: {smi.stdout.strip() or smi.stderr.strip()}")
        native = hardware.pick_dtype("auto", device)
        if native != dtype:  # a T4 or V100: train.py would pick float16
            report.say(f"note: this GPU has no native bfloat16 (train.py picks {native} here): "
                       f"parts 1 and 2 time emulated bfloat16, and their MFU means little")
    peak, source = hardware.peak_flops(device, dtype)
    report.say(f"peak: {peak / 1e12:.1f} TFLOP/s ({source})" if peak else f"peak: unknown ({source}): MFU not reported")
    report.say(f"flash attention: {flash_attention_check(device, dtype)}")


def flash_attention_check(device, dtype):
    """Whether SDPA's flash kernel runs GPT-2 small's attention (bf16, 12 heads of 64, causal)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 12, 1024, 64, device=device, dtype=hardware.DTYPES[dtype])
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True, scale=64**-0.5)
        return "used (SDPA's flash kernel runs this model's attention)"
    except RuntimeError as e:
        return f"NOT available here, SDPA falls back to another kernel ({str(e).splitlines()[0][:120]})"


def train_step_part(report, cfg, device, dtype):
    report.say("\n## 1. GPT-2 small (124M), block 1024: one training step, "
               f"{'float32 eager (dry run)' if cfg['dry_run'] else 'bf16 autocast + torch.compile'}, "
               "fused AdamW on CUDA, SDPA attention")
    case = "+ chunked head loss (our default)" if cfg["dry_run"] else "+ bf16 autocast + torch.compile"
    model = TINY if cfg["dry_run"] else [f"--batch_size={cfg['batch_size']}"]
    timing = ["--warmup=1", "--iters=2"] if cfg["dry_run"] else ["--warmup=5", "--iters=20"]
    status, stopped, lines = run_part(report, [sys.executable, "bench.py", GPT2_SMALL, *model, *timing,
                                               f"--device={device}", f"--case={case}"], LIMITS["train_step"])
    measured = [line for line in lines if line.startswith("{")]  # the worker's JSON, among compile warnings
    if status != 0 or not measured:
        report.say(f"RESULT: the training step {'ran out of time' if stopped else 'failed'}")
        return
    numbers = json.loads(measured[-1])
    mfu = "n/a (no datasheet peak)" if numbers["mfu"] is None else f"{numbers['mfu'] * 100:.1f}%"
    report.say(f"RESULT: {numbers['ms']:.1f} ms/step, {numbers['tokens_per_s']:,.0f} tokens/s, MFU {mfu} "
               f"(target >= 45% on an H100/H200), peak memory {numbers['peak_mb']:,.0f} MB")


def sophia_part(report, cfg, device, dtype):
    report.say("\n## 2. SophiaG's amortised overhead on the same model (Hessian pass every 10 steps)")
    model = TINY if cfg["dry_run"] else [f"--batch_size={cfg['batch_size']}"]
    settings = ["--warmup=1", "--iters=2", "--compile=False"] if cfg["dry_run"] else ["--warmup=3", "--iters=10", "--compile=True"]
    status, stopped, lines = run_part(report, [sys.executable, "bench.py", GPT2_SMALL, *model, *settings,
                                               "--section=sophia", "--hess_interval=10", f"--device={device}",
                                               f"--dtype={dtype}"], LIMITS["sophia"])
    ratio = next((float(m.group(1)) for m in map(re.compile(r"\(([\d.]+)x AdamW\)").search, lines) if m), None)
    if status != 0 or ratio is None:
        report.say(f"RESULT: the SophiaG comparison {'ran out of time' if stopped else 'failed'}")
        return
    report.say(f"RESULT: SophiaG costs {(ratio - 1) * 100:+.1f}% per iteration against AdamW, its Hessian pass amortised")


def chinese_recipe_part(report, cfg, device):
    budget = "4 steps of a tiny model (dry run)" if cfg["dry_run"] else f"{cfg['zh_seconds']} s of wall-clock"
    report.say(f"\n## 3. The default Chinese recipe: prepare.py, then {cfg['zh_config']} for {budget}")
    data_dir = cfg["data_dir"]
    if not data_dir:
        status, _, _ = run_part(report, [sys.executable, "prepare.py"], LIMITS["prepare"])
        if status != 0:
            report.say("RESULT: prepare.py failed")
            return
        data_dir = os.path.join("data", "zh_default")
    out_dir = cfg["zh_out_dir"]
    metrics = os.path.join(out_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)  # a fresh run; an old log would count as this one's first step
    # the dry run trains a few steps of a tiny model instead: --max_minutes needs a dozen steps to time
    limits = [*TINY, "--gradient_accumulation_steps=1", "--eval_iters=1", "--val_full_split=False", "--log_interval=1",
              "--max_minutes=0", "--warmup_iters=2", "--max_iters=4", "--lr_decay_iters=4", "--compile=False"] if cfg["dry_run"] else \
        [f"--max_minutes={cfg['zh_seconds'] / 60:g}"]
    command = [sys.executable, "train.py", cfg["zh_config"], f"--device={device}", f"--data_dir={data_dir}",
               f"--out_dir={out_dir}", "--init_from=scratch", "--overwrite_out_dir=True", *limits]
    status, stopped, _ = run_part(report, command, cfg["zh_seconds"] + LIMITS["zh_startup"], stop_signal=signal.SIGTERM,
                                  stop_when=lambda: bool(events_of(out_dir, "train")))
    steps, evals = events_of(out_dir, "train"), events_of(out_dir, "eval")
    # train.py exits 128 + 15 after a SIGTERM it handled (checkpoint saved): a stop, not a failure
    if status not in (0, 128 + signal.SIGTERM) or not steps:
        report.say(f"RESULT: the run failed (exit status {status})")
        return
    times = [s["time_ms"] for s in steps[1:]] or [steps[0]["time_ms"]]  # the first step includes warm-up
    how_it_ended = "overran its budget: stopped by SIGTERM" if stopped else "finished"
    report.say(f"RESULT: {steps[-1]['iter'] + 1} steps ({how_it_ended}), median {statistics.median(times):.1f} ms/step, "
               f"{statistics.median(s['tokens_per_sec'] for s in steps):,.0f} tokens/s, last train loss {steps[-1]['loss']:.4f}; "
               "val loss " + ", ".join(f"{e['val_loss']:.4f} ({e.get('val_bpc', float('nan')):.3f} bits/char) @{e['iter']}"
                                       for e in evals))


def sampling_part(report, cfg, device):
    tokens = 8 if cfg["dry_run"] else 200
    report.say(f"\n## 4. Sampling: bench.py --section=sample, {tokens} new tokens, batch 1, top-k 200, float32")
    model = [*TINY, "--compile=False"] if cfg["dry_run"] else [cfg["zh_config"], "--vocab_size=8192", "--block_size=256",
                                                               "--compile=True"]
    status, stopped, lines = run_part(report, [sys.executable, "bench.py", *model, "--section=sample", f"--sample_tokens={tokens}",
                                               f"--device={device}"], LIMITS["sample"])
    speeds = [line for line in lines if line.strip().startswith(f"{tokens} new tokens:")]
    if status != 0 or not speeds:
        report.say(f"RESULT: sampling {'ran out of time' if stopped else 'failed'}")
        return
    paths = re.findall(r"(without KV cache|decode.py step(?:, compiled)?) [\d.]+ ms \(([\d,]+) tokens/s\)", speeds[0])
    parted = any(line.startswith("note:") and "drew other tokens" in line for line in lines)
    report.say(f"RESULT: {'tokens that part between paths (see the note)' if parted else 'the same tokens on every path'}; "
               "tokens/s " + ", ".join(f"{name} {speed}" for name, speed in paths))


def events_of(out_dir, kind):
    """The run's metrics.jsonl events of one kind, also while it is being written (a line cut short)."""
    try:
        return [e for e in run_log.read_events(out_dir) if e["event"] == kind]
    except json.JSONDecodeError:
        return []


def main():
    cfg = parse_args(DEFAULTS, sys.argv[1:])
    if not cfg["dry_run"] and not (cfg["device"].startswith("cuda") and torch.cuda.is_available()):
        raise UserError(f"gpu_check.py measures a CUDA GPU and --device={cfg['device']} is none here (or this torch "
                        f"is a CPU build); --dry_run=True checks the script on the CPU")
    device, dtype = ("cpu", "float32") if cfg["dry_run"] else (hardware.pick_device(cfg["device"]), "bfloat16")
    if cfg["data_dir"] and not os.path.isdir(cfg["data_dir"]):
        raise UserError(f"--data_dir={cfg['data_dir']} is not a folder; leave it empty to run prepare.py")
    report = Report(os.path.abspath(cfg["out"]))
    cfg["data_dir"] = cfg["data_dir"] and os.path.abspath(cfg["data_dir"])
    cfg["zh_out_dir"] = os.path.abspath(cfg["zh_out_dir"])
    os.chdir(os.path.dirname(os.path.abspath(__file__)))  # the scripts and configs are found from here
    started = time.monotonic()
    header(report, cfg, device, dtype)
    for part in (lambda: train_step_part(report, cfg, device, dtype), lambda: sophia_part(report, cfg, device, dtype),
                 lambda: chinese_recipe_part(report, cfg, device), lambda: sampling_part(report, cfg, device)):
        report.save()
        part()
    report.say(f"\ngpu_check.py took {time.monotonic() - started:.0f} s")
    report.save()


if __name__ == "__main__":
    run(main)

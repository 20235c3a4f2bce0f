"""Speed and memory of training and sampling, measured, with each speed lever against the baseline.

    python bench.py                                   # the tiny config on this machine's device
    python bench.py config/train_gpt2_small_adam.py --device=cuda --dtype=bfloat16 --compile=True --repeats=1
    python bench.py --section=train --iters=30
    python bench.py --out=logs/bench.md               # print the report and write it to a file too
    python bench.py config/train_zh_speedrun.py --vocab_size=12288 --section=step   # the recipe's step against its GEMMs

Sections (--section=all|train|sophia|sample|step):
- train: ms per iteration of train_step (opengpt/training.py), the step train.py runs (median after warm-up),
  tokens/s, MFU and peak RSS (peak GPU memory on CUDA) for the nanoGPT path (fp32 eager, full
  logits materialised, F.cross_entropy) and for each lever added on top of it. Each case runs in
  fresh processes, `repeats` of them round-robin, so allocator settings and peak memory are its own.
- sophia: AdamW vs SophiaG per iteration of train_step, a SophiaG step plus 1/k of its
  Hessian pass (--hessian_batch=fresh) or of its estimate in the step's forward (=step), in the
  configured dtype (and compiled with --compile=True); optimizer.step() alone; the cost of drawing
  the Hessian pass's labels.
- sample: new tokens without the KV cache, with it through the modules' forward (the loop before
  opengpt/decode.py) and with decode.py's one-token step, eager and (with --compile=True) compiled (the
  same tokens each way: checked as it runs; the compile happens before the timing).
- step: train_step in the configured dtype (compiled with --compile=True) against its own matrix
  products replayed apart (those of an eager step, recorded with their shapes, strides and dtypes:
  the body's, the head's, SDPA's attention kernels and the optimizer's), as step / GEMMs; and the
  head loss alone, its time besides its GEMMs per logit element.

The batches are random tokens: speed does not depend on the text. What is compared is timed in
alternation (see timed_in_alternation), `warmup` untimed rounds first, then `iters` timed ones.
The report is printed; --out=FILE also writes it, whole or not at all, headed by its command and the
machine it ran on (logs/bench.md holds the one on our 2-core CPU).
"""
import dataclasses
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from opengpt import hardware
from opengpt import optimizers
import train
from opengpt.cli import UserError, run
from opengpt.files import write_text
from configurator import parse_args
from opengpt.data import padded_vocab_size
from opengpt.head_loss import linear_cross_entropy
from opengpt.run_setup import model_args_from
from opengpt.training import Training, train_step
from model import GPT, GPTConfig, sample_next_token

DEFAULTS = train.DEFAULTS | dict(
    # the tiny Chinese config on a CPU (config/train_tiny_zh_cpu.py) unless a config file says otherwise
    n_layer=2, n_head=2, n_embd=128, block_size=64, batch_size=12, gradient_accumulation_steps=1,
    dropout=0.1, bias=True, device="auto", dtype="float32",
    section="all",
    warmup=5,
    iters=20,
    repeats=3,  # processes per training case, run round-robin; the median is reported
    sample_tokens=256,
    vocab_size=50257,  # tokens of the tokenizer; 8192 for the default trained BPE (padded to a multiple of 64 in the model)
    case="",  # internal: the train case a worker process measures
    out="",  # also write the report to this file (e.g. logs/bench.md); "" = print it only
)
REPORT = []  # the lines of the report, for --out
COMMAND = "python bench.py"  # a report file begins with it, in backquotes: an --out that does not is not replaced


def say(line=""):
    print(line, flush=True)
    REPORT.extend(line.splitlines() or [""])

# Training cases: (name, settings), each adding one lever to the baseline's path.
TRAIN_CASES = [
    ("nanoGPT path: fp32 eager, full logits", dict(keep_memory=False, fused_loss=False, dtype="float32", compile=False)),
    ("+ keep freed memory (mallopt)", dict(keep_memory=True, fused_loss=False, dtype="float32", compile=False)),
    ("+ chunked head loss (our default)", dict(keep_memory=True, fused_loss=True, dtype="float32", compile=False)),
    ("+ torch.compile", dict(keep_memory=True, fused_loss=True, dtype="float32", compile=True)),
    ("+ bf16 autocast (eager)", dict(keep_memory=True, fused_loss=True, dtype="bfloat16", compile=False)),
    ("+ bf16 autocast + torch.compile", dict(keep_memory=True, fused_loss=True, dtype="bfloat16", compile=True)),
]


def timed_in_alternation(functions, device, warmup, iters):
    """Median seconds per call of each of `functions` (name -> function), called in turn, round after
    round: a shared machine's speed drifts, and timing one function's calls after another's would
    credit the drift to one of them. The first `warmup` rounds are not timed."""
    times = {name: [] for name in functions}
    for round_index in range(warmup + iters):
        for name, fn in functions.items():
            hardware.synchronize(device)
            start = time.perf_counter()
            fn()
            hardware.synchronize(device)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def build(cfg, device, optimizer_name="adamw"):
    """A GPT with vocab_size tokens (padded as train.py pads them) and the optimizer optimizers.py builds for it."""
    torch.manual_seed(0)
    config = GPTConfig(**model_args_from(cfg, padded_vocab_size(cfg["vocab_size"])))
    model = GPT(config).to(device)
    optimizer = optimizers.REGISTRY[optimizer_name].build(model, cfg | dict(optimizer=optimizer_name), device.split(":")[0])
    return model, optimizer


class RandomTokens:
    """Stands in for data.TokenData in train_step: random windows of token ids (the speed of a
    step does not depend on the text)."""

    def __init__(self, block_size, vocab_size):
        self.block_size, self.vocab_size = block_size, vocab_size

    def train_micro_batches(self, generator, batch_size, count, rank, world_size):
        windows = torch.randint(self.vocab_size, (world_size, count, batch_size, self.block_size + 1), generator=generator)[rank]
        return [w[:, :-1] for w in windows], [w[:, 1:] for w in windows]


def build_training(cfg, device, optimizer_name, dtype, compile_model=False, fused_loss=True):
    """The Training that train.py would build for this model and optimizer, on random tokens."""
    model, optimizer = build(cfg, device, optimizer_name)
    model.chunked_head_loss = fused_loss  # False: nanoGPT's full logits and F.cross_entropy, as --chunked_head_loss=False
    return Training(cfg=cfg | dict(optimizer=optimizer_name), model=torch.compile(model) if compile_model else model,
                    raw_model=model, optimizer=optimizer,
                    scaler=torch.amp.GradScaler(device.split(":")[0], enabled=(dtype == "float16")),
                    autocast=hardware.autocast_context(device, dtype), data=RandomTokens(cfg["block_size"], cfg["vocab_size"]),
                    device=device, rank=0, world_size=1, batch_generator=torch.Generator().manual_seed(0),
                    hessian_generator=torch.Generator().manual_seed(1))


def measure_train_case(cfg, device, settings):
    """A worker process: time train_step in one training case; returns a dict."""
    if settings["keep_memory"] and device == "cpu":
        hardware.keep_freed_memory()
    t = build_training(cfg, device, "adamw", settings["dtype"], settings["compile"], settings["fused_loss"])
    seconds = timed_in_alternation({"step": functools.partial(train_step, t, 0)}, device, cfg["warmup"], cfg["iters"])["step"]
    peak, _ = hardware.peak_flops(device, settings["dtype"])
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.startswith("cuda"):
        peak_rss_mb = torch.cuda.max_memory_allocated() / 2**20  # on a GPU the device memory is what counts
    tokens = t.tokens_per_step
    mfu = t.raw_model.flops_per_token() * tokens / seconds / peak if peak else None  # None: no datasheet peak for this GPU
    return dict(ms=seconds * 1000, tokens_per_s=tokens / seconds, mfu=mfu, peak_mb=peak_rss_mb)


def train_section(cfg, device, argv):
    say(f"## training: {cfg['n_layer']} layers, {cfg['n_embd']} wide, {cfg['batch_size']} x {cfg['block_size']} tokens "
        f"x {cfg['gradient_accumulation_steps']} micro-batches "
        f"per iteration, on {hardware.device_name(device)}; median of {cfg['repeats']} processes per case")
    say(f"{'case':42} {'ms/iter':>9} {'tokens/s':>9} {'MFU':>7} {'peak MB':>8} {'speedup':>8}")
    skipped = {name: "this CPU has no native bf16 matmul (no AVX512_BF16/AMX), autocast would be slower"
               for name, settings in TRAIN_CASES
               if settings["dtype"] != "float32" and device == "cpu" and not hardware.cpu_has_bf16_matmul()}
    cases = [name for name, _ in TRAIN_CASES if name not in skipped]
    # Round-robin over the cases, `repeats` times: a shared machine's speed drifts, and running each
    # case's processes back to back would credit that drift to the case.
    results = {name: [] for name in cases}
    failures = {}
    for _ in range(cfg["repeats"]):
        for name in cases:
            if name in failures:
                continue
            result = subprocess.run([sys.executable, __file__, *argv, f"--case={name}", f"--device={device}"],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                failures[name] = (result.stderr.strip().splitlines() or ["no output"])[-1]
            else:
                results[name].append(json.loads(result.stdout.strip().splitlines()[-1]))
    baseline_ms = None
    tokens = cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]
    for name, _ in TRAIN_CASES:
        if name in skipped or name in failures:
            say(f"{name:42} {'skipped' if name in skipped else 'failed'}: {(skipped | failures)[name][:120]}")
            continue
        ms = statistics.median(r["ms"] for r in results[name])
        mfu = "n/a" if results[name][0]["mfu"] is None else f"{statistics.median(r['mfu'] for r in results[name]) * 100:6.1f}%"
        peak_mb = max(r["peak_mb"] for r in results[name])
        baseline_ms = baseline_ms or ms
        say(f"{name:42} {ms:9.1f} {tokens / ms * 1000:9.0f} {mfu:>7} {peak_mb:8.0f} {baseline_ms / ms:7.2f}x")


def sophia_section(cfg, device):
    k = cfg["hess_interval"] or 10
    cfg = cfg | dict(hess_interval=k)
    tokens = cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]
    if device == "cpu":
        hardware.keep_freed_memory()
    say(f"\n## SophiaG vs AdamW: per iteration amortised over a Hessian interval of {k}, {tokens} tokens per step, "
        f"{cfg['dtype']}{', compiled' if cfg['compile'] else ''}")
    adamw, sophiag = (build_training(cfg, device, name, cfg["dtype"], cfg["compile"]) for name in ("adamw", "sophiag"))
    on_the_step = build_training(cfg | dict(hessian_batch="step"), device, "sophiag", cfg["dtype"], cfg["compile"])
    # train_step itself: at iteration 0 SophiaG only steps, at iteration k-1 it also runs the
    # Hessian pass (--hessian_batch=fresh) or estimates h in the step's own forward (=step). All are
    # timed every round: a step's cost does not depend on how often the Hessian EMA was updated.
    seconds = timed_in_alternation(dict(adamw=functools.partial(train_step, adamw, 0),
                                        sophiag=functools.partial(train_step, sophiag, 0),
                                        with_hessian=functools.partial(train_step, sophiag, k - 1),
                                        with_hessian_in_step=functools.partial(train_step, on_the_step, k - 1)),
                                   device, cfg["warmup"], cfg["iters"])
    say(f"AdamW   {seconds['adamw'] * 1000:8.1f} ms/iter")
    for label, timed in (("--hessian_batch=fresh (the authors')", "with_hessian"), ("--hessian_batch=step", "with_hessian_in_step")):
        hessian = seconds[timed] - seconds["sophiag"]
        amortised = seconds["sophiag"] + hessian / k
        say(f"SophiaG {amortised * 1000:8.1f} ms/iter  ({amortised / seconds['adamw']:.3f}x AdamW) {label}: a step "
            f"{seconds['sophiag'] * 1000:.1f} ms + the Hessian's cost {hessian * 1000:.1f} ms / {k}")

    optimizer_steps = {}
    for name in ("adamw", "sophiag"):
        model, optimizer = build(cfg, device, name)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        optimizer_steps[name] = functools.partial(optimizer.step, **optimizers.REGISTRY[name].step_kwargs(tokens))
    seconds = timed_in_alternation(optimizer_steps, device, cfg["warmup"], cfg["iters"])
    say(f"optimizer.step() alone: AdamW {seconds['adamw'] * 1000:.2f} ms, SophiaG {seconds['sophiag'] * 1000:.2f} ms "
        f"({seconds['sophiag'] / seconds['adamw']:.2f}x)")

    from opengpt.head_loss import sample_labels

    model, _ = build(cfg, device)
    real_vocab = cfg["vocab_size"]
    x = torch.randint(0, real_vocab, (cfg["batch_size"], cfg["block_size"]), device=device)
    with torch.no_grad():
        hidden = model.hidden_states(x).flatten(0, 1)
        logits = model.lm_head(hidden)
    seconds = timed_in_alternation(dict(categorical=lambda: torch.distributions.Categorical(logits=logits).sample(),
                                        ours=lambda: sample_labels(hidden, model.lm_head.weight, real_vocab)), device, 1, 3)
    say(f"label sampling for {hidden.shape[0]} x {real_vocab}: torch.distributions.Categorical {seconds['categorical'] * 1000:.1f} ms, "
        f"head_loss.sample_labels (logits included) {seconds['ours'] * 1000:.1f} ms")


# What the step section replays apart: the matrix products, and SDPA's attention kernels, whose work
# is mostly products done inside the kernel (on a CPU the recipe's float32 attention runs there; on a
# GPU flash, memory-efficient or cuDNN attention, whichever SDPA picks).
SDPA_KERNELS = [f"aten::_scaled_dot_product_{kernel}_attention{suffix}" for kernel in ("flash", "efficient", "cudnn")
                for suffix in ("", "_backward")]
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", *SDPA_KERNELS,
            "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}


class GemmRecorder(TorchDispatchMode):
    """Records each matrix product dispatched inside it (GEMM_OPS) as (part, op, arguments), every
    tensor argument replaced by its TensorSpec; part is what the recorder is told the step is in."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size, self.part, self.calls = vocab_size, "body", []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name in GEMM_OPS:
            tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            part = self.part
            if part == "body" and func._schema.name.startswith("aten::_scaled_dot_product_"):
                part = "attention"
            elif part == "body" and any(self.vocab_size in t.shape for t in tensors):
                part = "head"
            spec = lambda a: TensorSpec(a.shape, a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else a
            self.calls.append((part, func, tree_map(spec, args), tree_map(spec, kwargs)))
        return func(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    shape: tuple
    stride: tuple
    dtype: torch.dtype
    device: torch.device


def replayer(calls):
    """A function that runs `calls` (GemmRecorder's) again in order, on random inputs of the same shapes,
    strides and dtypes (one tensor per distinct spec, made once)."""
    generator = torch.Generator().manual_seed(0)
    inputs = {}

    def tensor_for(spec):
        if spec not in inputs:
            size = sum((n - 1) * s for n, s in zip(spec.shape, spec.stride)) + 1 if all(spec.shape) else 0
            storage = torch.randn(size, generator=generator).to(spec.dtype) if spec.dtype.is_floating_point else torch.zeros(size, dtype=spec.dtype)
            inputs[spec] = storage.to(spec.device).as_strided(spec.shape, spec.stride)
        return inputs[spec]

    realised = [(func, *tree_map(lambda a: tensor_for(a) if isinstance(a, TensorSpec) else a, (args, kwargs)))
                for _, func, args, kwargs in calls]

    def replay():
        for func, args, kwargs in realised:
            func(*args, **kwargs)
    return replay


def record_gemms(t):
    """GemmRecorder's calls of one eager step of Training t: forward and backward, then the optimizer's step."""
    recorder = GemmRecorder(t.raw_model.config.vocab_size)
    with recorder:
        t.accumulate_gradients(t.micro_batches(t.batch_generator, t.cfg["gradient_accumulation_steps"]))
        recorder.part = "optimizer"
        t.optimizer.step(**t.spec.step_kwargs(t.tokens_per_step))
    t.optimizer.zero_grad(set_to_none=True)
    return recorder.calls


PROFILED_STEPS = 3


def top_ops(fn, device, calls, count=12):
    """(name, ms per call) of the `count` ops with the most time of their own over `calls` calls of fn
    under torch.profiler: the device's time on CUDA, the CPU's elsewhere."""
    on_cuda = device.startswith("cuda")
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_cuda else [])
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(calls):
            fn()
    own_time = (lambda e: e.self_device_time_total) if on_cuda else (lambda e: e.self_cpu_time_total)
    events = sorted(profile.key_averages(), key=own_time, reverse=True)[:count]
    return [(e.key, own_time(e) / calls / 1000) for e in events]


def step_section(cfg, device):
    """The step train.py runs against its own matrix products: train_step, and apart the same GEMMs
    (shapes, strides, dtype, threads, allocator) recorded from an eager step; then the head loss alone
    against its GEMMs, per logit element."""
    dtype = cfg["dtype"]
    if device == "cpu":
        hardware.keep_freed_memory()  # as train.py: the step and the GEMMs both run with it
    tokens = cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]
    optimizer_name = cfg["optimizer"]
    say(f"\n## the step against its own matrix products: {cfg['n_layer']} layers, {cfg['n_embd']} wide, {tokens} tokens, "
        f"vocabulary {padded_vocab_size(cfg['vocab_size'])}, {optimizer_name}, {dtype}{', compiled' if cfg['compile'] else ''}, "
        f"on {hardware.device_name(device)}")
    if cfg["compile"] and device == "cpu":
        from torch._inductor import config as inductor_config
        inductor_config.cpp.enable_kernel_profile = True  # the profile below names inductor's C++ kernels
    t = build_training(cfg, device, optimizer_name, dtype, cfg["compile"])
    calls = record_gemms(build_training(cfg, device, optimizer_name, dtype))
    parts = {part: replayer([c for c in calls if c[0] == part]) for part in ("body", "attention", "head", "optimizer")}
    seconds = timed_in_alternation({"step": functools.partial(train_step, t, 0), **parts}, device, cfg["warmup"], cfg["iters"])
    gemms = sum(seconds[part] for part in parts)
    say(f"step (train_step)              {seconds['step'] * 1000:9.1f} ms")
    say(f"its matrix products, apart     {gemms * 1000:9.1f} ms: " + ", ".join(
        f"{part} {seconds[part] * 1000:.1f} ({sum(c[0] == part for c in calls)} calls)" for part in parts))
    say(f"step / matrix products         {seconds['step'] / gemms:9.2f}x   (the rest: {(seconds['step'] - gemms) * 1000:.1f} ms)")
    say(f"the step's top ops by own time, ms per step (torch.profiler over {PROFILED_STEPS} steps; compiled code shows as "
        f"its graphs and kernels, cpp_fused_*):")
    for name, ms in top_ops(functools.partial(train_step, t, 0), device, PROFILED_STEPS):
        say(f"  {ms:8.1f}  {name}")

    n_rows, vocab = tokens, padded_vocab_size(cfg["vocab_size"])
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(n_rows, cfg["n_embd"], generator=generator).to(device).requires_grad_()
    weight = (torch.randn(vocab, cfg["n_embd"], generator=generator) * 0.02).to(device).requires_grad_()
    targets = torch.randint(cfg["vocab_size"], (n_rows,), generator=generator).to(device)
    autocast = hardware.autocast_context(device, dtype)

    def head_loss():
        with autocast:
            loss = linear_cross_entropy(hidden, weight, targets)
        loss.backward()
        hidden.grad = weight.grad = None

    head_calls = GemmRecorder(vocab)
    with head_calls:
        head_loss()
    seconds = timed_in_alternation(dict(loss=head_loss, gemms=replayer(head_calls.calls)), device, cfg["warmup"], cfg["iters"])
    rest = seconds["loss"] - seconds["gemms"]
    say(f"head loss (forward and backward, {n_rows} x {vocab} logits) {seconds['loss'] * 1000:.1f} ms, its GEMMs "
        f"{seconds['gemms'] * 1000:.1f} ms; besides them {rest / (n_rows * vocab) * 1e9:.2f} ns per logit element")


def generate_through_the_modules(model, idx, max_new_tokens, temperature, top_k, generator, n_real_vocab):
    """The KV-cached loop before opengpt/decode.py, the baseline of the sample section: every new token
    through the modules' forward (model.hidden_states with the caches, SDPA) and torch.cat of the sequence."""
    from opengpt.decode import head_columns

    block = model.config.block_size
    caches, head = model.new_kv_caches(idx.size(0), idx.device), head_columns(model)
    for i in range(max_new_tokens):
        if idx.size(1) <= block:
            x = model.hidden_states(idx[:, -1:] if i else idx, caches)
        else:  # past the block the window slides: nothing cached is reused
            x = model.hidden_states(idx[:, -block:])
        idx_next = sample_next_token((x[:, -1, :] @ head)[:, :n_real_vocab], temperature, top_k, generator)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def sample_section(cfg, device):
    model, _ = build(cfg, device)
    model.eval()
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    compiled = cfg["compile"]
    if compiled:
        hardware.check_compile_works(device)
    say(f"\n## sampling without the KV cache, with it through the modules (the loop before opengpt/decode.py), "
        f"and with decode.py's one-token step (model.generate's){', eager and compiled' if compiled else ''}, "
        f"block_size {cfg['block_size']}, batch 1, top-k 200")
    sampling = dict(temperature=1.0, top_k=200, n_real_vocab=cfg["vocab_size"])
    for n in sorted({cfg["block_size"] - 1, cfg["sample_tokens"]}):
        paths = {"without KV cache": functools.partial(model.generate, prompt, n, use_cache=False, **sampling),
                 "modules + KV cache": functools.partial(generate_through_the_modules, model, prompt, n, **sampling),
                 "decode.py step": functools.partial(model.generate, prompt, n, use_cache=True, **sampling)}
        if compiled:
            paths["decode.py step, compiled"] = functools.partial(model.generate, prompt, n, use_cache=True, compiled=True, **sampling)
        with torch.no_grad():
            tokens = {name: path(generator=torch.Generator(device).manual_seed(0)) for name, path in paths.items()}
            parted = [name for name, t in tokens.items() if not torch.equal(t, tokens["without KV cache"])]
            # on a CPU the paths' float32 logits agree to ~1e-6 and every draw with them (tested); a GPU's kernels for
            # a block and for one token may round apart by more, and one draw that differs changes the rest
            assert not parted or device != "cpu", f"the paths drew different tokens: {parted}"
            if parted:
                say(f"note: {', '.join(parted)} drew other tokens than the path without the cache (float32 kernels "
                    f"round apart on {device}); each path still times {n} new tokens")
            results = timed_in_alternation({name: functools.partial(path, generator=torch.Generator(device).manual_seed(0))
                                            for name, path in paths.items()}, device, 0, 5)  # the run above warmed up
        speeds = ", ".join(f"{name} {results[name] * 1000:.1f} ms ({n / results[name]:,.0f} tokens/s)" for name in paths)
        say(f"{n:4d} new tokens: {speeds}; decode.py's step {results['without KV cache'] / results['decode.py step']:.2f}x "
            f"without the cache, {results['modules + KV cache'] / results['decode.py step']:.2f}x the modules' cached loop")
        if compiled:
            say(f"     compiled: {results['without KV cache'] / results['decode.py step, compiled']:.2f}x without the cache, "
                f"{results['decode.py step'] / results['decode.py step, compiled']:.2f}x the eager step")
    say(f"(past {cfg['block_size']} tokens the window slides and every step reruns the whole block, cache or not: "
        f"with absolute positions there is nothing to reuse)")


def check_report_file(path):
    """Refuse, before any measuring, an --out that cannot take the report or holds something else."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"--out={path} is a folder; name a file in it, e.g. --out={os.path.join(path, 'bench.md')}")
    if not os.path.isdir(folder):
        raise UserError(f"--out={path}: its folder does not exist; create it or name a file in an existing folder")
    if os.path.exists(path) and not starts_as_a_report(path):
        raise UserError(f"--out={path} holds something other than a bench.py report; name a new file, or an earlier report to replace")
    try:
        with tempfile.TemporaryFile(dir=folder):  # the report is written there, through a temp file
            pass
    except OSError as e:
        raise UserError(f"--out={path}: cannot write in {folder} ({e.strerror or e}); name a file in a folder you can write") from None


def starts_as_a_report(path):
    """Whether path is a file that begins as bench.py's reports do (a pipe or device is not read)."""
    if not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(len(COMMAND) + 1) == f"`{COMMAND}"
    except OSError:
        return False


def main():
    argv = sys.argv[1:]
    cfg = parse_args(DEFAULTS, argv)
    device = hardware.pick_device(cfg["device"])
    cfg["dtype"] = hardware.pick_dtype(cfg["dtype"], device)  # "auto" or a typo resolved before minutes of measuring
    hardware.allow_tf32(device)  # as train.py does
    if cfg["case"]:
        settings = dict(TRAIN_CASES)[cfg["case"]]
        print(json.dumps(measure_train_case(cfg, device, settings)))
        return
    if cfg["section"] not in ("all", "train", "sophia", "sample", "step"):
        raise UserError(f"unknown --section={cfg['section']}; use all, train, sophia, sample or step")
    for key in ("iters", "repeats"):
        if cfg[key] < 1:
            raise UserError(f"--{key}={cfg[key]} must be at least 1")
    if cfg["out"]:
        check_report_file(cfg["out"])
    say(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    worker_argv = [a for a in argv if not a.startswith(("--case=", "--device=", "--out="))]
    if cfg["section"] in ("all", "train"):
        train_section(cfg, device, worker_argv)
    if cfg["section"] in ("all", "sophia"):
        sophia_section(cfg, device)
    if cfg["section"] in ("all", "sample"):
        # plain float32 (sample.py sets no TF32): rounded to TF32 the paths' logits differ by ~1e-3, and a near
        # tie would draw another token, which the section's check of equal tokens takes for a bug
        torch.set_float32_matmul_precision("highest")
        sample_section(cfg, device)
        hardware.allow_tf32(device)
    if cfg["section"] in ("all", "step"):
        step_section(cfg, device)
    if cfg["out"]:
        command = " ".join([COMMAND, *(a for a in argv if not a.startswith("--out="))])
        write_text(cfg["out"], f"`{command}` on {hardware.device_name(device)}:\n\n```\n" + "\n".join(REPORT) + "\n```\n")
        print(f"wrote {cfg['out']}", file=sys.stderr)


if __name__ == "__main__":
    run(main)

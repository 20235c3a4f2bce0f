"""The device side of the scripts: which device and dtype to use, autocast, and the device's peak
FLOP/s for model FLOPs utilisation (MFU)."""
import errno
import os
import re
import time
from contextlib import nullcontext
from functools import lru_cache

import torch

from opengpt import files
from opengpt.cli import UserError, first_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Dense (no sparsity) tensor-core peaks from the vendors' datasheets, FLOP/s, by dtype. "float32" is
# the rate a float32 run's matmuls get: TF32 tensor cores where the GPU has them (allow_tf32 turns
# them on), the FP32 rate where it has none (T4, V100) or where no TF32 figure is published (A10G).
# A key matches when it stands as whole words in torch.cuda.get_device_name() ("L4" is not "L40S"),
# and the first match wins, so the longer names come first.
GPU_PEAKS = {
    "H200 NVL": {"bfloat16": 835e12, "float16": 835e12, "float32": 417.5e12},
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 494.5e12},
    "GH200": {"bfloat16": 989e12, "float16": 989e12, "float32": 494.5e12},
    "H100 NVL": {"bfloat16": 835e12, "float16": 835e12, "float32": 417.5e12},
    "H100 PCIe": {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12},
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 494.5e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
    "A10G": {"bfloat16": 70e12, "float16": 70e12, "float32": 31.2e12},
    "A10": {"bfloat16": 125e12, "float16": 125e12, "float32": 62.5e12},
    "L40S": {"bfloat16": 362e12, "float16": 362e12, "float32": 183e12},
    "L40": {"bfloat16": 181e12, "float16": 181e12, "float32": 90.5e12},
    "L4": {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12},
    "T4": {"float16": 65e12, "float32": 8.1e12},
    "V100": {"float16": 125e12, "float32": 15.7e12},
    "RTX 4090": {"bfloat16": 165e12, "float16": 165e12, "float32": 82.6e12},
    "RTX 3090": {"bfloat16": 71e12, "float16": 71e12, "float32": 35.6e12},
}


def pick_device(requested):
    """'auto' -> cuda, then mps, then cpu. A named device that is absent is a user error."""
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = requested.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device={requested} but this machine has no CUDA GPU (or this torch is a CPU build); use --device=cpu or auto")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"--device={requested} but MPS is not available here; use --device=cpu or auto")
    if kind not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown --device={requested}; use auto, cpu, cuda, cuda:N or mps")
    return requested


def pick_dtype(requested, device):
    """'auto' -> bfloat16 on GPUs that support it, float16 on older CUDA GPUs, bfloat16 on CPUs that
    multiply it natively (AVX512_BF16, AMX: faster than float32 there, measured in bench.py), else float32."""
    if requested == "auto":
        if device.startswith("cuda"):
            # a T4 (sm 7.5) only emulates bfloat16, slowly; by default the check counts emulation as support
            return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
        if device == "cpu" and cpu_has_bf16_matmul():
            return "bfloat16"
        return "float32"
    if requested not in DTYPES:
        raise UserError(f"unknown --dtype={requested}; use float32, bfloat16, float16 or auto")
    return requested


def autocast_context(device, dtype):
    """Mixed precision for bfloat16/float16 (CPU autocast included), a no-op for float32."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=DTYPES[dtype])


def device_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    if device == "mps":
        return "Apple MPS"
    names = [line.split(":", 1)[1].strip() for line in _read_cpuinfo("/proc/cpuinfo").splitlines()
             if line.startswith("model name")]
    return f"{names[0] if names else 'CPU'} ({torch.get_num_threads()} threads)"


@lru_cache(maxsize=None)
def peak_flops(device, dtype):
    """(FLOP/s or None, how it was obtained). Datasheet peak for known NVIDIA GPUs; for a Linux CPU
    the vector units' peak at its clock (a measurement would read low whenever the CPU is shared,
    putting MFU above 100%); on MPS and other CPUs the rate of big dense matmuls measured here. An
    NVIDIA GPU missing from GPU_PEAKS gets None: MFU is then not reported, because a measured rate
    is the achievable one, not the peak, and would read MFU too high."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        match = gpu_peak(name, dtype)
        if match is None:
            return None, f"no {dtype} datasheet peak for {name} in hardware.GPU_PEAKS"
        return match[0], f"datasheet {match[1]} {dtype}"
    if device == "cpu":
        cpu_peak = cpu_peak_flops(dtype)
        if cpu_peak:
            return cpu_peak
    return measured_matmul_flops(device, dtype), f"measured {dtype} matmul"


def gpu_peak(name, dtype):
    """(FLOP/s, key) of the first GPU_PEAKS entry whose key stands as whole words in the device
    name and that has a peak for dtype, or None."""
    for key, peaks in GPU_PEAKS.items():
        if dtype in peaks and re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name):
            return peaks[dtype], key
    return None


def cpu_peak_flops(dtype, cpuinfo_path="/proc/cpuinfo"):
    """(FLOP/s, description) of the threads torch uses, from /proc/cpuinfo: clock x FLOPs per cycle
    of the widest units the flags show (two FMA pipes per core); None where cpuinfo is missing."""
    info = _read_cpuinfo(cpuinfo_path)
    mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
    if not mhz:
        return None
    flags = _cpu_flags(info)
    # fp32 FLOPs per cycle per core: 2 FMA pipes x lanes x 2 (multiply and add)
    per_cycle = 64 if "avx512f" in flags else 32 if "fma" in flags else 8
    units = "AVX-512" if "avx512f" in flags else "AVX2/FMA" if "fma" in flags else "SSE"
    if dtype == "bfloat16" and "amx_bf16" in flags:
        per_cycle, units = 1024, "AMX-BF16"
    elif dtype == "bfloat16" and "avx512_bf16" in flags:
        per_cycle, units = 128, "AVX512-BF16"
    elif dtype == "float16" and "amx_fp16" in flags:
        per_cycle, units = 1024, "AMX-FP16"
    threads = torch.get_num_threads()
    return threads * max(mhz) * 1e6 * per_cycle, f"{threads} threads x {max(mhz):.0f} MHz x {per_cycle} {units} FLOP/cycle"


def cpu_has_bf16_matmul(cpuinfo_path="/proc/cpuinfo"):
    """Whether the CPU multiplies bf16 natively (AVX512_BF16 or AMX); without, bf16 autocast is slower than fp32."""
    return bool(_cpu_flags(_read_cpuinfo(cpuinfo_path)) & {"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo_path="/proc/cpuinfo"):
    """The CPU's feature flags (avx2, avx512f, avx512_bf16, amx_bf16, ...); empty where unknown."""
    return _cpu_flags(_read_cpuinfo(cpuinfo_path))


def _read_cpuinfo(path):
    """The text of /proc/cpuinfo, or "" where there is none (not Linux)."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _cpu_flags(info):
    return next((set(line.split(":")[1].split()) for line in info.splitlines() if line.startswith("flags")), set())


def measured_matmul_flops(device, dtype, seconds=0.3):
    torch_dtype = DTYPES[dtype]
    # CPUs without native half-precision matmuls take seconds for one 1024^3 float16 product; a GPU
    # needs 4096^3 for the work to outweigh the launch and the timer
    size = (256 if dtype == "float16" else 1024) if device == "cpu" else 4096
    # a private generator: measuring must not move the training run's random state
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=torch_dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=torch_dtype, generator=generator)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    for _ in range(100):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    return 2 * size**3 / best


def allow_tf32(device):
    """float32 matmuls on TensorFloat-32 tensor cores (CUDA, Ampere and newer), as nanoGPT does: inputs
    rounded to 10 significand bits, float32 accumulation, several times the FP32 rate. Set for CUDA
    only: the same setting also lets oneDNN round a CPU's float32 matmuls to TF32
    (torch.backends.mkldnn.matmul.fp32_precision becomes "tf32"), and CPU runs keep their exact float32."""
    if device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")


def synchronize(device):
    """Wait for the device's queued work, so a timer around it measures the work."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    elif device == "mps":
        torch.mps.synchronize()


def keep_freed_memory():
    """Ask glibc to keep freed big buffers instead of returning them to the OS. Without this, every
    training step page-faults fresh memory for the head's logits and gradients, a large share of a
    tiny-model step on CPU (logs/README.md#keeping-freed-memory). No-op where glibc's mallopt is absent."""
    if os.name != "posix":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**30))


def check_compile_works(device):
    """torch.compile fails late, at the first forward, with a long traceback, where it has no
    working backend (no C compiler, an unsupported Python or platform). Try it on a tiny function
    first, so that --compile=True fails in one line instead."""
    if not hasattr(torch, "compile"):
        raise UserError("--compile=True needs torch.compile (PyTorch 2.0 or newer); use --compile=False")
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(4, device=device))
    except Exception as e:  # any backend failure means the same thing to the user
        unwritable = unwritable_folder_error(e)
        if unwritable is not None:
            raise compile_cache_error("torch.compile could not write its compiled code", unwritable) from None
        raise UserError(f"torch.compile does not work on this machine ({type(e).__name__}: {first_line(e)}); "
                        f"use --compile=False") from None


UNWRITABLE = errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT
FULL = errno.ENOSPC, errno.EDQUOT


def unwritable_folder_error(e):
    """The OSError in e's chain of causes that says a folder cannot be written (read-only, not ours, full),
    or None: compiling fails so where torch's compile cache folder cannot take the code. A compiler run
    (inductor's CppCompileError) reports it in its output: `ld: final link failed: No space left on device`."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in UNWRITABLE:
            return e
        output = getattr(e, "output", None)
        for code in FULL if isinstance(output, str) else ():  # a read-only folder fails before any compiler runs
            if os.strerror(code) in output:
                return OSError(code, os.strerror(code))
        e = e.__cause__ or e.__context__
    return None


def compile_cache_error(what, e, folder=None):
    """The one-line error for compiled code that torch's compile cache folder (or `folder` in it) could not
    take: e, an OSError, says why."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    folder = folder or cache_dir()
    full = e.errno in FULL
    return UserError(f"{what} in {folder} ({e.strerror or e}{', ' + files.space_left(folder) if full else ''}); "
                     f"{'free space there, ' if full else ''}set TORCHINDUCTOR_CACHE_DIR to a folder you can write, "
                     f"or use --compile=False")

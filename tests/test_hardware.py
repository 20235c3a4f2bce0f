import pytest
import torch

import hardware
from cli import UserError


def fake_cpuinfo(tmp_path, flags, mhz=2000.0):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\ncpu MHz\t\t: {mhz}\nflags\t\t: fpu sse {flags}\n\n"
                    f"processor\t: 1\ncpu MHz\t\t: {mhz}\nflags\t\t: fpu sse {flags}\n")
    return str(path)


@pytest.mark.parametrize("flags, dtype, per_cycle", [
    ("avx2 fma", "float32", 32),
    ("avx2 fma avx512f", "float32", 64),
    ("avx2 fma avx512f avx512_bf16 amx_bf16", "bfloat16", 1024),
    ("avx2 fma", "bfloat16", 32),  # no bf16 units: bf16 runs no faster than fp32
])
def test_cpu_peak_counts_the_vector_units_the_flags_show(tmp_path, monkeypatch, flags, dtype, per_cycle):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    flops, description = hardware.cpu_peak_flops(dtype, fake_cpuinfo(tmp_path, flags))
    assert flops == 2 * 2000e6 * per_cycle
    assert "2 threads x 2000 MHz" in description


@pytest.mark.parametrize("flags, native", [("avx2 fma", False), ("avx512f avx512_bf16", True), ("amx_bf16 amx_tile", True)])
def test_native_bf16_matmul_is_read_from_the_flags(tmp_path, flags, native):
    assert hardware.cpu_has_bf16_matmul(fake_cpuinfo(tmp_path, flags)) is native


def test_missing_cpuinfo_falls_back(tmp_path):
    assert hardware.cpu_peak_flops("float32", str(tmp_path / "none")) is None
    assert hardware.cpu_has_bf16_matmul(str(tmp_path / "none")) is False


def test_absent_devices_are_user_errors():
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            hardware.pick_device("cuda")
    with pytest.raises(UserError, match="unknown --device=tpu"):
        hardware.pick_device("tpu")


@pytest.mark.parametrize("native_bf16, expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_dtype_on_a_cpu_is_bfloat16_only_where_it_is_native(monkeypatch, native_bf16, expected):
    monkeypatch.setattr(hardware, "cpu_has_bf16_matmul", lambda: native_bf16)
    assert hardware.pick_dtype("auto", "cpu") == expected
    assert hardware.pick_dtype("auto", "mps") == "float32"

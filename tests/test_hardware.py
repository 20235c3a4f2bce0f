import pytest
import torch

from opengpt import hardware
from opengpt.cli import UserError


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


@pytest.mark.parametrize("name, dtype, peak, key", [
    ("NVIDIA L4", "bfloat16", 121e12, "L4"),
    ("NVIDIA L40S", "bfloat16", 362e12, "L40S"),  # "L4" is a substring of it, not its name
    ("NVIDIA L40", "float16", 181e12, "L40"),
    ("NVIDIA A10", "bfloat16", 125e12, "A10"),
    ("NVIDIA A10G", "bfloat16", 70e12, "A10G"),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12, "A100"),
    ("NVIDIA A100-SXM4-80GB", "float32", 156e12, "A100"),  # TF32: allow_tf32 turns it on
    ("NVIDIA H100 PCIe", "bfloat16", 756e12, "H100 PCIe"),
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12, "H100"),
    ("NVIDIA H200", "bfloat16", 989e12, "H200"),
    ("NVIDIA GH200 480GB", "bfloat16", 989e12, "GH200"),
    ("Tesla T4", "float16", 65e12, "T4"),
])
def test_gpu_peaks_match_whole_names_only(monkeypatch, name, dtype, peak, key):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    hardware.peak_flops.cache_clear()
    assert hardware.peak_flops("cuda", dtype) == (peak, f"datasheet {key} {dtype}")
    hardware.peak_flops.cache_clear()


@pytest.mark.parametrize("name, dtype", [("NVIDIA RTX PRO 6000 Blackwell", "bfloat16"), ("Tesla T4", "bfloat16")])
def test_a_gpu_without_a_datasheet_peak_reports_no_mfu(monkeypatch, name, dtype):
    # never a measured matmul: on a big GPU one 1024^3 product is launch-bound and MFU would read
    # several times too high
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(hardware, "measured_matmul_flops", lambda *args: pytest.fail("measured a GPU's peak"))
    hardware.peak_flops.cache_clear()
    peak, source = hardware.peak_flops("cuda:1", dtype)
    hardware.peak_flops.cache_clear()
    assert peak is None and name in source and "GPU_PEAKS" in source


def test_tf32_is_allowed_on_cuda_only():
    assert torch.get_float32_matmul_precision() == "highest"
    hardware.allow_tf32("cpu")
    assert torch.get_float32_matmul_precision() == "highest"  # CPU float32 stays exact
    try:
        hardware.allow_tf32("cuda:0")
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision("highest")

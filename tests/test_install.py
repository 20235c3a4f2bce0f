"""install.sh picks the torch build for the machine. Run against stand-ins for python3 (its pip
calls are logged, never executed), uname and nvidia-smi, so no package is installed."""
import os
import subprocess

import pytest

from conftest import REPO

FAKE_PYTHON = r"""#!/usr/bin/env bash
# $FAKE_TORCH: none | cpu | cuda, the torch this stand-in has
if [ "$1" = "-m" ]; then echo "$*" >> "$PIP_LOG"; exit 0; fi
case "$2" in
  *cuda.is_available*) [ "$FAKE_TORCH" = cuda ] ;;
  *__version__*) [ "$FAKE_TORCH" != none ] && echo "2.13.0+$FAKE_TORCH" ;;
  *"import torch"*) [ "$FAKE_TORCH" != none ] ;;
  *) echo "unexpected: $*" >&2; exit 3 ;;
esac
"""


def run_install(tmp_path, system, torch_build, gpu):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_ins = {"python3": FAKE_PYTHON, "uname": f"#!/usr/bin/env bash\necho {system}\n"}
    if gpu:
        stand_ins["nvidia-smi"] = "#!/usr/bin/env bash\necho 'GPU 0: NVIDIA L4'\n"
    for name, text in stand_ins.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    pip_log = tmp_path / "pip.log"
    pip_log.touch()
    env = dict(os.environ, PATH=f"{bin_dir}:/usr/bin:/bin", PYTHON="python3", PIP_LOG=str(pip_log), FAKE_TORCH=torch_build)
    result = subprocess.run(["bash", os.path.join(REPO, "install.sh")], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    torch_wheels = {word for word in pip_log.read_text().split() if word.startswith("torch==")}
    return torch_wheels, result.stderr


@pytest.mark.parametrize("system, wheel", [("Linux", "torch==2.13.0+cpu"), ("Darwin", "torch==2.13.0")])
def test_without_torch_the_cpu_build_is_installed_quietly_on_a_machine_without_a_gpu(tmp_path, system, wheel):
    torch_wheels, stderr = run_install(tmp_path, system, "none", gpu=False)
    assert torch_wheels == {wheel}  # macOS has no +cpu wheel: its plain one is the CPU/MPS build
    assert "!!!" not in stderr


def test_a_gpu_machine_is_told_loudly_that_its_torch_is_a_cpu_build(tmp_path):
    torch_wheels, stderr = run_install(tmp_path, "Linux", "none", gpu=True)
    assert torch_wheels == {"torch==2.13.0+cpu"}  # never a CUDA build unasked
    assert "NVIDIA GPU" in stderr and "would train on the CPU" in stderr and "pip install torch==2.13.0" in stderr


@pytest.mark.parametrize("torch_build, warned", [("cpu", True), ("cuda", False)])
def test_an_installed_torch_is_kept_and_checked_against_the_gpu(tmp_path, torch_build, warned):
    torch_wheels, stderr = run_install(tmp_path, "Linux", torch_build, gpu=True)
    assert torch_wheels == set()
    assert ("would train on the CPU" in stderr) is warned

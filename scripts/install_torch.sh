#!/usr/bin/env bash
# Install PyTorch with the given Python (a virtual environment's), without pulling the
# CUDA build (several GB) onto a machine that has no NVIDIA GPU.
#
#   bash scripts/install_torch.sh .venv/bin/python
#
# - torch already importable: nothing to do (Colab, or a second `make`).
# - an NVIDIA GPU (nvidia-smi works): the normal `pip install torch`, a CUDA build.
# - no GPU: the CPU build of torch $TORCH_VERSION (default 2.13.0) from PyTorch's CPU index;
#   where that index is unreachable (as on our CI machines, which keep that CPU wheel
#   locally for pip), plain `pip install torch==$TORCH_VERSION`.
set -euo pipefail
py="${1:-python3}"
version="${TORCH_VERSION:-2.13.0}"

if "$py" -c "import torch" 2>/dev/null; then
  echo "torch $("$py" -c 'import torch; print(torch.__version__)') is already installed"
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "NVIDIA GPU found: installing the CUDA build of torch"
  exec "$py" -m pip install torch
fi
echo "No NVIDIA GPU: installing the CPU build of torch $version"
"$py" -m pip install "torch==$version" --index-url https://download.pytorch.org/whl/cpu --retries 0 --timeout 30 \
  || "$py" -m pip install "torch==$version"

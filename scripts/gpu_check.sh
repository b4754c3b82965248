#!/usr/bin/env bash
# Prove the CUDA path on a machine with an NVIDIA GPU, from a fresh checkout, in under 5 minutes:
#   bash scripts/gpu_check.sh [--workdir DIR] [--cpu-dry-run]
# Sets up a venv ($VENV, default .venv) with `pip install -r requirements.txt -e .` unless it
# already imports torch; PIP_ARGS is added to that pip call (a CUDA wheel from another index:
# PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cu128"). Then builds a small
# JPEG-packed sample, measures the loader with CPU vs GPU decoding, finetunes one epoch of
# AlexNet (bf16, fp16) and VGG16 (bf16) with --decode-device cuda, and prints one summary line
# (scripts/gpu_check.py). Without a usable GPU it says so and exits 1; --cpu-dry-run runs
# tiny versions of every step on the CPU instead (the tests use it).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if ! "$VENV/bin/python" -c "import torch, torchvision, pipeline" 2>/dev/null; then
    echo "gpu_check: setting up $VENV (pip install -r requirements.txt -e .)"
    "$PYTHON" -m venv "$VENV"
    # shellcheck disable=SC2086  # PIP_ARGS is a list of options
    "$VENV/bin/pip" install --quiet --disable-pip-version-check ${PIP_ARGS:-} \
        -r requirements.txt -e .
fi

dry=0
for arg in "$@"; do [ "$arg" = "--cpu-dry-run" ] && dry=1; done
if [ "$dry" = 0 ] && ! "$VENV/bin/python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    "$VENV/bin/python" -c "import torch; print(f'gpu_check: torch.cuda.is_available() is False '
        f'(torch {torch.__version__}, CUDA build {torch.version.cuda}): no usable NVIDIA GPU, '
        'driver or CUDA wheel (see PIP_ARGS above); nothing measured')"
    exit 1
fi
exec "$VENV/bin/python" scripts/gpu_check.py "$@"

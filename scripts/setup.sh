#!/usr/bin/env bash
# Set up vlacache from a fresh clone: the package with its test, LIBERO and SIMPLER extras, and the system
# libraries the simulators render with on a CPU (Debian/Ubuntu; apt steps need root or passwordless sudo).
# Idempotent and non-interactive. The README's first command runs it.
#
# torch: if none is installed, the CPU build torch==2.13.0 is installed (a bare `torch` requirement would pull
# several GB of CUDA packages); an installed torch (e.g. your CUDA build) is kept. torchvision is never
# installed: transformers imports it whenever present, and a registry build may not match your torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
export DEBIAN_FRONTEND=noninteractive

if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  "$PYTHON" -m pip install "torch==2.13.0"
fi
"$PYTHON" -m pip install -e ".[test,libero,simpler]"
# SIMPLER first: it brings Mesa (EGL, DRI, lavapipe) >= 25 from bookworm-backports; LIBERO's EGL step then
# only adds what is still missing.
PYTHON="$PYTHON" bash scripts/setup_simpler.sh
bash scripts/setup_libero.sh egl
PYTHON="$PYTHON" bash scripts/setup_openpi_client.sh
PYTHON="$PYTHON" bash scripts/setup_maniskill.sh

#!/usr/bin/env bash
# The venv ManiSkill's motion planner records demonstrations in: mplib 0.1.1 (ManiSkill 3.0.1's pin) crashes
# under numpy 2, so this venv sees every package of the main environment (vlacache, torch, mani_skill, mplib)
# except numpy, which it pins to 1.26. `vlacache demos` switches to it by itself for a ManiSkill config.
# Idempotent.
#   bash scripts/setup_maniskill.sh   -> .venvs/maniskill/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
VENV=.venvs/maniskill
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import numpy, mplib, vlacache; assert numpy.__version__ < '2'" >/dev/null 2>&1; then
  echo "setup_maniskill: $VENV present"
  exit 0
fi
"$PYTHON" -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install -q "numpy==1.26.4"
"$VENV/bin/python" -c "import numpy, mplib, mani_skill, vlacache; print('setup_maniskill: ok, numpy', numpy.__version__)"

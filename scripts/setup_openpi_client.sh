#!/usr/bin/env bash
# A throwaway venv with the real openpi client (PyPI openpi-client 0.1.2), which the openpi-protocol tests drive
# vlacache's server with. It needs numpy<2, so it cannot share vlacache's environment. Idempotent.
#   bash scripts/setup_openpi_client.sh   -> .venvs/openpi-client/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
VENV=.venvs/openpi-client
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import openpi_client.websocket_client_policy" >/dev/null 2>&1; then
  echo "setup_openpi_client: $VENV present"
  exit 0
fi
"$PYTHON" -m venv "$VENV"
# openpi-client imports typing_extensions without declaring it
"$VENV/bin/python" -m pip install -q "openpi-client==0.1.2" typing_extensions
"$VENV/bin/python" -c "import openpi_client.websocket_client_policy, numpy; print('setup_openpi_client: ok, numpy', numpy.__version__)"

"""The model-server script `vla-eval serve` launches: `uv run scripts/vla_eval_server.py --args.config=NAME --port=N`
(vla-eval's convention; configs/vla_eval/serve_*.yaml name this script). Run it from the repository root with
UV_NO_PROJECT=1 so uv uses the Python vlacache is installed in instead of building a project venv."""

import sys

from vlacache.integrations.vla_eval import main

if __name__ == "__main__":
    sys.exit(main())

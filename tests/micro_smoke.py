"""The closed-loop smoke episode of the shipped OFT micro-policy: one LIBERO-Spatial episode (task 0, shipped init
state 0) through `vlacache run`, without a cache and with VLA-Cache. tests/test_shipped.py checks it against
tests/fixtures/micro_oft_smoke.json; `python tests/micro_smoke.py` records that file again (after retraining)."""

import json
import subprocess
import sys
from pathlib import Path

EXPECTATION = Path(__file__).parent / "fixtures" / "micro_oft_smoke.json"
ARGS = ["micro_oft_libero_spatial_ablation", "env.tasks=[0]", "env.init_states=[0]", "policies=[no_cache,vla_cache]",
        "launcher.devices=1", "--quiet"]


def run_smoke(out: Path) -> dict[str, dict]:
    """policy label -> {success, env_steps, queries, reuse_ratio} of the smoke episode, from the CLI's results."""
    done = subprocess.run([sys.executable, "-m", "vlacache.cli", "run", *ARGS, f"output_dir={out}"],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"vlacache run failed ({done.returncode}): {done.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    return {r["policy"]: {k: r[k] for k in ("success", "env_steps", "queries", "reuse_ratio", "error")} for r in records}


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        outcome = run_smoke(Path(tmp) / "smoke")
    EXPECTATION.write_text(json.dumps(outcome, indent=1) + "\n")
    print(json.dumps(outcome, indent=1))

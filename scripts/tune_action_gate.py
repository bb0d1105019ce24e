"""Choose the action-aware gate's `min_motion` on recorded demonstrations, never on the reported episodes.

The gate (strategies/gates.py, `action-aware`) turns reuse off at a query whose previous chunk's mean translation
norm was below `min_motion`, meant to catch fine manipulation. Here the expert's chunks stand in for the policy's:
a query is "fine" when a step of the chunk it produces is within `--near` steps of a gripper change (grasp or
release). For each threshold: how often the gate fires, and how well firing separates fine from coarse queries
(true / false positive rates, balanced accuracy). Writes a CSV and prints the best threshold.

    python scripts/tune_action_gate.py data/demos/libero_spatial results/tuning/action_aware_gate_libero_spatial.csv
"""

import argparse
import csv
from pathlib import Path

import numpy as np


def queries(actions: np.ndarray, chunk: int, near: int) -> tuple[np.ndarray, np.ndarray]:
    """(motion the gate reads, whether the query is fine) for each query after the first of one episode."""
    changes = np.nonzero(np.diff(actions[:, 6]) != 0)[0] + 1
    close = np.zeros(len(actions), bool)
    for c in changes:
        close[max(c - near, 0): c + near + 1] = True
    starts = range(chunk, len(actions), chunk)
    motion = [np.linalg.norm(actions[s - chunk: s, :3], axis=-1).mean() for s in starts]
    fine = [close[s: s + chunk].any() for s in starts]
    return np.array(motion), np.array(fine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demos", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--chunk", type=int, default=8, help="actions per query (the OFT protocol's 8)")
    parser.add_argument("--near", type=int, default=4, help="steps around a gripper change that count as fine")
    args = parser.parse_args()
    files = sorted(args.demos.glob("*.npz"))
    if not files:
        raise SystemExit(f"no demonstrations (*.npz) in {args.demos}; record them with `vlacache demos`")
    pairs = [queries(np.load(f)["actions"], args.chunk, args.near) for f in files]
    motion = np.concatenate([m for m, _ in pairs])
    fine = np.concatenate([f for _, f in pairs])
    rows = []
    for threshold in np.round(np.arange(0.1, 1.61, 0.1), 2):
        fires = motion < threshold
        tpr = float((fires & fine).sum() / max(fine.sum(), 1))
        fpr = float((fires & ~fine).sum() / max((~fine).sum(), 1))
        rows.append({"min_motion": threshold, "fires": round(float(fires.mean()), 4), "tpr": round(tpr, 4),
                     "fpr": round(fpr, 4), "balanced_accuracy": round((tpr + 1 - fpr) / 2, 4)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    best = max(rows, key=lambda r: r["balanced_accuracy"])
    print(f"{len(files)} episodes, {len(motion)} queries, {fine.mean():.0%} fine; best min_motion {best['min_motion']} "
          f"(fires on {best['fires']:.0%} of queries, balanced accuracy {best['balanced_accuracy']}); table in {args.out}")


if __name__ == "__main__":
    main()

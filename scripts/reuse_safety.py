"""When is reused K/V safe? Success lost against no cache by query cadence and by decoder depth, for each cache
row of the study (BENCHMARKS.md, "When is reuse safe"), from the committed episode records:

- cadence: the shipped 4-layer OFT micro-policy executing 1, 2 or 8 actions per query (8: its own protocol);
- depth: the same recipe with 4, 8 or 16 decoder layers, at 8 actions per query.

Writes a CSV (one line per axis, setting and row: episodes, successes, success lost in points with its 95%
interval (Newcombe's, from the two Wilson intervals; conservative for rows run on the same episodes), the
episodes only no cache / only the row succeeded on, reuse, and the reused K/V's age in queries and env steps)
and a PNG with one panel per axis. Settings whose result folder is missing or empty are left out and listed.

    python scripts/reuse_safety.py [--out results/reuse_safety]
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

from vlacache.eval.report import difference_interval
from vlacache.eval.results import load_records, result_files

ROWS = ["static-reuse", "vla-cache", "vla-cache-drift-age1", "vla-cache-cross-view"]
BASELINE = "no-cache"
R = "results/micro_oft_libero_spatial"
# (axis, setting) -> the result folders holding its rows (a row is taken from the first folder that has it)
SOURCES = {
    ("cadence", 1): [f"{R}_cadence1"],
    ("cadence", 2): [f"{R}_cadence2"],
    ("cadence", 8): [f"{R}_ablation", f"{R}_age", f"{R}_views"],
    ("depth", 4): [f"{R}_ablation", f"{R}_age", f"{R}_views"],
    ("depth", 8): [f"{R}_deep8"],
    ("depth", 16): [f"{R}_deep16"],
}
AXIS_TITLES = {"cadence": "env steps per query (4-layer decoder)", "depth": "decoder layers (8 env steps per query)"}


def latest_records(folders: list[str]) -> dict[str, dict[str, dict]]:
    """policy -> episode key -> its latest record, each policy from the first folder that holds it."""
    out: dict[str, dict[str, dict]] = {}
    for folder in folders:
        files = result_files(Path(folder))
        if not files:
            continue
        mine: dict[str, dict[str, dict]] = {}
        for record in load_records(files, quiet=True):
            mine.setdefault(record["policy"], {})[f"{record['task']}|{record['init_state']}"] = record
        for policy, episodes in mine.items():
            out.setdefault(policy, episodes)
    return out


def won(record: dict) -> bool:
    return record.get("success") is True and record.get("error") is None


def row_line(axis: str, setting: int, policy: str, rows: dict[str, dict[str, dict]]) -> dict | None:
    """The CSV line of one row, over the episodes both it and no cache have run (None: it has none yet)."""
    base, mine = rows.get(BASELINE, {}), rows.get(policy, {})
    shared = sorted(set(base) & set(mine))
    if not shared:
        return None
    k_base = sum(won(base[e]) for e in shared)
    k_row = sum(won(mine[e]) for e in shared)
    n = len(shared)
    low, high = difference_interval(k_base, n, k_row, n)
    ages = [mine[e]["reused_age"] for e in shared if mine[e].get("reused_age")]
    return {
        "axis": axis, "setting": setting, "policy": policy, "episodes": n,
        "baseline_successes": k_base, "successes": k_row,
        "lost_points": 100 * (k_base - k_row) / n, "lost_ci95_low": 100 * low, "lost_ci95_high": 100 * high,
        "only_baseline_won": sum(won(base[e]) and not won(mine[e]) for e in shared),
        "only_row_won": sum(won(mine[e]) and not won(base[e]) for e in shared),
        "errors": sum(mine[e].get("error") is not None for e in shared),
        "reuse": statistics.mean(mine[e].get("reuse_ratio") or 0.0 for e in shared),
        "age_queries_mean": statistics.mean(a["queries_mean"] for a in ages) if ages else None,
        "age_env_steps_mean": statistics.mean(a["env_steps_mean"] for a in ages) if ages else None,
    }


def plot(lines: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)
    for ax, axis in zip(axes, AXIS_TITLES):
        settings = sorted({s for a, s in SOURCES if a == axis})
        for i, policy in enumerate(ROWS):
            mine = [x for x in lines if x["axis"] == axis and x["policy"] == policy]
            if not mine:
                continue
            xs = [settings.index(x["setting"]) + (i - 1.5) * 0.06 for x in mine]
            ys = [x["lost_points"] for x in mine]
            err = [[max(0.0, y - x["lost_ci95_low"]) for x, y in zip(mine, ys)],
                   [max(0.0, x["lost_ci95_high"] - y) for x, y in zip(mine, ys)]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=policy)
            for x, y, line in zip(xs, ys, mine):
                if line["episodes"] < 100:
                    ax.annotate(f"n={line['episodes']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.axhline(0, color="grey", lw=0.8)
        def tick(setting):  # the setting, and no cache's own success there (the level the loss is measured from)
            mine = [x for x in lines if x["axis"] == axis and x["setting"] == setting]
            if not mine:
                return str(setting)
            widest = max(mine, key=lambda x: x["episodes"])
            return f"{setting}\n(no cache {100 * widest['baseline_successes'] / widest['episodes']:.0f}%, n={widest['episodes']})"

        ax.set_xticks(range(len(settings)), [tick(s) for s in settings])
        ax.set_xlim(-0.5, len(settings) - 0.5)
        ax.set(xlabel=AXIS_TITLES[axis], title=f"by {axis}")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("success lost vs no cache (points, 95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/reuse_safety")
    args = parser.parse_args()
    lines, missing = [], []
    for (axis, setting), folders in SOURCES.items():
        rows = latest_records(folders)
        found = [row_line(axis, setting, policy, rows) for policy in ROWS]
        if not any(found):
            missing.append(f"{axis} {setting} ({', '.join(folders)})")
        lines += [x for x in found if x is not None]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "success_lost.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(lines[0]))
        writer.writeheader()
        writer.writerows(lines)
    plot(lines, out / "success_lost.png")
    for line in lines:
        print(f"{line['axis']:8} {line['setting']:>3} {line['policy']:22} n={line['episodes']:3}  no cache "
              f"{line['baseline_successes']:3}  row {line['successes']:3}  lost {line['lost_points']:5.1f} "
              f"[{line['lost_ci95_low']:.0f}, {line['lost_ci95_high']:.0f}]  reuse {100 * line['reuse']:.1f}%")
    if missing:
        print("no results yet: " + "; ".join(missing))
    print(f"wrote {out / 'success_lost.csv'} and {out / 'success_lost.png'}")


if __name__ == "__main__":
    main()

"""Training curves of a `vlacache train` run: the per-epoch metrics Lightning's CSV logger wrote, as one CSV and
one PNG next to them."""

from __future__ import annotations

import csv
from pathlib import Path


def write_curves(out: Path, metrics: dict[str, str], ylabel: str = "value", name: str = "loss_curves") -> None:
    """logs/version_*/metrics.csv (one per run of the command; a resumed run writes a new version) ->
    <name>.csv (epoch, then one column per logged metric, named by `metrics`: logged name -> column) and <name>.png."""
    rows: dict[int, dict[str, float]] = {}
    versions = sorted((out / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    for path in versions:
        with open(path) as handle:
            for row in csv.DictReader(handle):
                epoch = int(float(row["epoch"])) if row.get("epoch") else None
                for metric in metrics:
                    if epoch is not None and row.get(metric):
                        rows.setdefault(epoch, {})[metric] = float(row[metric])
    if not rows:
        return
    with open(out / f"{name}.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", *metrics.values()])
        for epoch in sorted(rows):
            writer.writerow([epoch, *(rows[epoch].get(metric, "") for metric in metrics)])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for metric, column in metrics.items():
        points = [(e, r[metric]) for e, r in sorted(rows.items()) if metric in r]
        if points:
            ax.plot(*zip(*points), marker="o", label=column.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=100)
    plt.close(fig)

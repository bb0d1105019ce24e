"""The paper's table (summary.md / summary.csv) and plots from episode records, and one table over several
runs' result directories (`vlacache report`).

Success is counted over ALL attempted episodes: an episode whose latest attempt raised an error counts as a
failure, and the error count stands beside it; nothing is silently excluded."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

from ..runtime import LATENCY_PARTS
from ..messages import warn
from ..types import InputError


def suite_of(task: str) -> str:
    return task.split("/", 1)[0] if "/" in task else "all"


def _mean(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.mean(values) if values else None


def success_rate(records: list[dict]) -> float | None:
    """Successes over every attempted episode (errored ones count as failures); None when the env reports no
    success at all for these episodes (e.g. the replay env)."""
    if not records or not any(isinstance(r.get("success"), bool) for r in records):
        return None
    return sum(r.get("success") is True and r.get("error") is None for r in records) / len(records)


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    """The 95% Wilson score interval of a success rate (sound for small n and rates near 0 or 1)."""
    if n <= 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # at 0 or n successes the bound on that side is exactly 0 or 1 (rounding can leave 0.9999999999999999)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def difference_interval(k1: int, n1: int, k2: int, n2: int, z: float = 1.959964) -> tuple[float, float] | None:
    """The 95% interval of the difference of two success rates k1/n1 - k2/n2 (Newcombe's hybrid score method,
    from the two Wilson intervals; it treats the samples as independent, so for two rows run on the same
    episodes it is conservative)."""
    first, second = wilson_interval(k1, n1, z), wilson_interval(k2, n2, z)
    if first is None or second is None:
        return None
    p1, p2 = k1 / n1, k2 / n2
    d = p1 - p2
    return (d - math.sqrt((p1 - first[0]) ** 2 + (second[1] - p2) ** 2),
            d + math.sqrt((first[1] - p1) ** 2 + (p2 - second[0]) ** 2))


def summarize(records: list[dict], policy_order: list[str]) -> tuple[list[str], list[dict]]:
    """One row per policy: success per suite and mean, FLOPs, latency split, control frequency, reuse ratio."""
    suites = sorted({suite_of(r["task"]) for r in records})
    odd = sorted({repr(r["success"]) for r in records if r.get("success") not in (True, False, None)})
    if odd:
        warn(f"episode records carry success values that are not true / false / null ({', '.join(odd)}): they count "
             "as failures; fix the records (or the env adapter that wrote them)")
    rows = []
    for policy in policy_order + sorted({r["policy"] for r in records} - set(policy_order)):
        mine = [r for r in records if r["policy"] == policy]
        if not mine:
            continue
        ok = [r for r in mine if r.get("error") is None]
        row = {"policy": policy, "episodes": len(mine), "errors": len(mine) - len(ok)}
        for suite in suites:
            episodes = [r for r in mine if suite_of(r["task"]) == suite]
            row[f"success/{suite}"] = rate = success_rate(episodes)
            interval = wilson_interval(round(rate * len(episodes)), len(episodes)) if rate is not None else None
            row[f"ci95_low/{suite}"], row[f"ci95_high/{suite}"] = interval or (None, None)
        row["success/mean"] = _mean([row[f"success/{s}"] for s in suites])
        row["flops"] = _mean([r["flops_mean"] for r in ok if r.get("flops_mean") is not None])
        for part in LATENCY_PARTS + ("total",):
            row[f"{part}_ms"] = _mean([r["latency_ms"][part]["mean"] for r in ok if r.get("latency_ms")])
        total = row["total_ms"]
        row["control_hz"] = 1000.0 / total if total else None
        row["reuse_ratio"] = _mean([r.get("reuse_ratio") for r in ok])
        layers = [r["reused_per_layer"] for r in ok if r.get("reused_per_layer")]
        row["reused_per_layer"] = [statistics.mean(x) for x in zip(*layers)] if layers else []
        rows.append(row)
    return suites, rows


def format_cell(value, kind: str, row: dict | None = None, key: str = "") -> str:
    if value is None:
        return "n/a"
    if kind == "sr":  # a suite's success with its 95% interval
        suite = key.split("/", 1)[1]
        low, high = row.get(f"ci95_low/{suite}"), row.get(f"ci95_high/{suite}")
        return f"{100 * value:.1f}% [{100 * low:.0f}, {100 * high:.0f}]" if low is not None else f"{100 * value:.1f}%"
    if kind.startswith("/"):  # FLOPs in a unit: "/1e+09" -> GFLOPs, 4 significant digits from 1 to 999
        shown = value / float(kind[1:])
        return f"{shown:.{1 if shown >= 100 else 2 if shown >= 10 else 3}f}"
    formats = {"pct": lambda v: f"{100 * v:.1f}%", "ms": lambda v: f"{v:.1f}", "hz": lambda v: f"{v:.2f}"}
    return formats.get(kind, str)(value)


FLOPS_UNITS = (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6))


def flops_column(rows: list[dict]) -> tuple[str, str, str]:
    """The FLOPs-per-query column in the largest unit in which the rows' values read as numbers >= 1 (a 7B model
    in TFLOPs, a micro-policy in MFLOPs, never 0.000581 TFLOPs)."""
    top = max((row["flops"] for row in rows if row.get("flops")), default=0.0)
    name, scale = next(((n, s) for n, s in FLOPS_UNITS if top >= s), FLOPS_UNITS[-1])
    return "flops", f"{name}/query", f"/{scale:.0e}"


def table_columns(suites: list[str], rows: list[dict]) -> list[tuple[str, str, str]]:
    cols = [("policy", "policy", "str")]
    cols += [(f"success/{s}", f"SR {s} [95% CI]", "sr") for s in suites]
    if len(suites) > 1:
        cols.append(("success/mean", "SR mean", "pct"))
    cols += [flops_column(rows), ("total_ms", "latency ms", "ms"), ("control_hz", "query Hz", "hz"),
             ("reuse_ratio", "reuse", "pct")]
    cols += [(f"{p}_ms", f"{p} ms", "ms") for p in LATENCY_PARTS]
    cols += [("episodes", "episodes", "str"), ("errors", "errors", "str")]
    return cols


def write_tables(out: Path, suites: list[str], rows: list[dict]) -> None:
    cols = table_columns(suites, rows)
    lines = ["| " + " | ".join(title for _, title, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(format_cell(row.get(key), kind, row, key) for key, _, kind in cols) + " |" for row in rows]
    notes = (
        "\nSR: success rate over ALL attempted episodes, with its 95% Wilson interval: an episode whose last attempt "
        "raised an error counts as a failure (errors: how many did; a re-run of the same command retries them, see "
        "`retry_errors`, `max_retries`); n/a: the env reports no success. FLOPs/query: decoder + vision per policy "
        "query (2 x MACs; summary.csv: in FLOPs), latency and reuse over the episodes without error. latency: mean "
        "end-to-end wall time of a policy query; query Hz = 1000 / latency. reuse: share of visual tokens whose K/V "
        "were reused, averaged over layers and queries.\n"
    )
    (out / "summary.md").write_text("\n".join(lines) + "\n" + notes)
    keys = []
    for key, _, kind in cols:
        keys += [key] + ([f"ci95_low/{key[8:]}", f"ci95_high/{key[8:]}"] if kind == "sr" else [])
    with open(out / "summary.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(keys)
        for row in rows:
            writer.writerow(["" if row.get(key) is None else row.get(key) for key in keys])


def write_plots(out: Path, rows: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for row in rows:
        x, y = 100 * (row["reuse_ratio"] or 0), 100 * (row["success/mean"] or 0)
        bounds = [(row[k], row[k.replace("low", "high")]) for k in row if k.startswith("ci95_low/")]
        if len(bounds) == 1 and bounds[0][0] is not None:  # one suite: its 95% interval as an error bar
            low, high = bounds[0]
            below, above = max(0.0, y - 100 * low), max(0.0, 100 * high - y)  # never negative after rounding
            ax.errorbar([x], [y], yerr=[[below], [above]], fmt="o", capsize=4, label=row["policy"])
        else:
            ax.scatter([x], [y], s=60, label=row["policy"])
    ax.set(xlabel="visual tokens reused (%)", ylabel="success rate (%)", title="success vs. reuse", ylim=(-5, 105))
    if all(row["success/mean"] is None for row in rows):
        ax.text(0.5, 0.5, "this env reports no success", transform=ax.transAxes, ha="center", color="grey")
    ax.legend(fontsize=8)
    ax = axes[1]
    for row in rows:
        if row["reused_per_layer"]:
            ax.plot(range(len(row["reused_per_layer"])), [100 * x for x in row["reused_per_layer"]], marker=".",
                    label=row["policy"])
    ax.set(xlabel="decoder layer", ylabel="visual tokens reused (%)", title="per-layer reuse", ylim=(-5, 105))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    ax = axes[2]
    bottom = [0.0] * len(rows)
    for part in LATENCY_PARTS:
        values = [row[f"{part}_ms"] or 0.0 for row in rows]
        ax.bar([r["policy"] for r in rows], values, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set(ylabel="ms per query", title="latency split")
    ax.tick_params(axis="x", labelrotation=20)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "summary.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


def combined_table(directories: list[Path]) -> str:
    """One markdown table over the result directories of several runs (`vlacache report`): a row per policy of
    each directory, in the order given, with its source, success and 95% interval per suite, reuse (overall and per
    layer), FLOPs and latency. Rows of different directories may come from different code or machines: each
    directory's run.json holds its fingerprints."""
    from .fingerprint import load_manifest
    from .results import load_records, result_files

    found, seen = [], set()
    for directory in map(Path, directories):
        if directory.resolve() in seen:
            warn(f"{directory} is given twice: its rows are shown once")
            continue
        seen.add(directory.resolve())
        files = result_files(directory)
        records = load_records(files) if files else []
        if not records:
            raise InputError(f"{directory} holds no episode records (episodes*.jsonl); pass the output_dir of a "
                             "`vlacache run`")
        found.append((directory, records, list(load_manifest(directory)["policies"])))
    suites = sorted({suite_of(r["task"]) for _, records, _ in found for r in records})
    columns = [(f"success/{s}", f"SR {s} [95% CI]", "sr") for s in suites]
    columns += [("reuse_ratio", "reuse", "pct"),
                flops_column([row for _, records, order in found for row in summarize(records, order)[1]]),
                ("total_ms", "query ms", "ms")]
    lines = ["| policy | results | " + " | ".join(title for _, title, _ in columns) + " | reused per layer | episodes | errors |",
             "|---|---|" + "---|" * (len(columns) + 3)]
    for directory, records, order in found:
        for row in summarize(records, order)[1]:
            cells = [format_cell(row.get(key), kind, row, key) if key in row else "-" for key, _, kind in columns]
            layers = " / ".join(f"{x:.2f}" for x in row["reused_per_layer"]) or "-"
            lines.append(f"| {row['policy']} | {directory.name} | " + " | ".join(cells)
                         + f" | {layers} | {row['episodes']} | {row['errors']} |")
    return "\n".join(lines) + "\n"


def print_summary(rows: list[dict], console=None) -> None:
    """The per-policy table on the console (`vlacache run`), with notes on errors and on a policy meant to reuse
    (`row["reuses"]`; without it, every policy but no-cache) that reused nothing."""
    from rich.console import Console
    from rich.table import Table

    suites = sorted({k.split("/", 1)[1] for row in rows for k in row if k.startswith("success/") and k != "success/mean"})
    cols = table_columns(suites, rows)
    table = Table(title="vlacache run: per policy (means over queries)")
    for _, title, _ in cols:
        table.add_column(title, justify="left" if title == "policy" else "right")
    for row in rows:
        table.add_row(*[format_cell(row.get(key), kind, row, key) for key, _, kind in cols])
    console = console or Console()
    if console.width < 170:
        console = Console(width=170)
    console.print(table)
    errors = sum(row.get("errors") or 0 for row in rows)
    if errors:
        console.print(
            f"Note: {errors} episode(s) raised an error; SR counts them as failures. The messages are in the\n"
            "'error' field of episodes*.jsonl; running the same command again retries them (retry_errors, max_retries)."
        )
    if any(row["reuse_ratio"] == 0 for row in rows if row.get("reuses", row["policy"] != "no-cache")):
        console.print(
            "Note: a policy with 0% reuse found nothing it judged safe to reuse. With random weights (the tiny\n"
            "presets) attention entropy does not fall with depth, so the entropy-adaptive schedule of vla-cache\n"
            "reuses nothing; trained checkpoints behave as in the paper. See docs/ARCHITECTURE.md."
        )

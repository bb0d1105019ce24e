"""`vlacache run`: every policy of an experiment over the env's episodes, with a readable summary."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .experiment import ExperimentConfig, build_backbone, build_env, build_policy
from .runtime import CachedVLA

LATENCY_PARTS = ("vision", "select", "prefill", "decode", "total")


@dataclass
class PolicyResult:
    """All steps of one policy: per-step stats and actions, per episode."""

    label: str
    steps: list[dict] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        n = len(self.steps)
        row: dict[str, Any] = {"policy": self.label, "steps": n}
        row["reuse_ratio"] = statistics.mean(s["reuse_ratio"] for s in self.steps) if n else 0.0
        row["gflops"] = statistics.mean(s["flops"]["total"] for s in self.steps) / 1e9 if n else 0.0
        for part in LATENCY_PARTS:
            row[f"{part}_ms"] = statistics.mean(s["latency_ms"][part] for s in self.steps) if n else 0.0
        return row


def run_experiment(config: ExperimentConfig, progress: bool = True) -> list[dict[str, Any]]:
    """Run each policy over `episodes` episodes of the env; write results.json and summary.md to output_dir."""
    backbone = build_backbone(config.backbone)
    env = build_env(config.env)
    policies = [build_policy(spec) for spec in config.policies]
    results = []
    for policy in policies:
        result = PolicyResult(policy.label)
        with CachedVLA(backbone, policy) as vla:
            for episode in range(config.episodes):
                vla.reset()
                obs, done, t = env.reset(), False, 0
                bar = tqdm(desc=f"{policy.label} ep{episode}", disable=not progress, unit="step", leave=False)
                while not done and (config.max_steps is None or t < config.max_steps):
                    step = vla.predict(obs)
                    result.steps.append({"episode": episode, **step.stats.as_dict()})
                    result.actions.append(step.actions)
                    obs, _, done, _ = env.step(step.actions[0, 0])
                    t += 1
                    bar.update()
                bar.close()
        results.append(result)
    env.close()
    rows = [r.summary() for r in results]
    reference = results[0].actions
    for row, result in zip(rows, results):
        diffs = [float(np.abs(a - b).max()) for a, b in zip(result.actions, reference)]
        row["max_action_diff_vs_first"] = max(diffs) if diffs else 0.0
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"config": config.__dict__, "summary": rows,
                                                   "steps": {r.label: r.steps for r in results}}, indent=1))
    (out / "summary.md").write_text(summary_markdown(rows, reference_label=results[0].label))
    return rows


COLUMNS = [
    ("policy", "policy", "{}"), ("steps", "steps", "{}"), ("reuse_ratio", "reuse", "{:.1%}"),
    ("gflops", "GFLOPs", "{:.3f}"), ("vision_ms", "vision ms", "{:.1f}"), ("select_ms", "select ms", "{:.1f}"),
    ("prefill_ms", "prefill ms", "{:.1f}"), ("decode_ms", "decode ms", "{:.1f}"), ("total_ms", "total ms", "{:.1f}"),
    ("max_action_diff_vs_first", "max |Δaction|", "{:.3f}"),
]


def summary_markdown(rows: list[dict], reference_label: str) -> str:
    head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(fmt.format(row[key]) for key, _, fmt in COLUMNS) + " |" for row in rows]
    note = f"\nMeans over all steps. max |Δaction|: largest difference of any action component from '{reference_label}'.\n"
    return "\n".join([head, rule, *body]) + "\n" + note


def print_summary(rows: list[dict], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="vlacache run: mean per control step")
    for _, title, _ in COLUMNS:
        table.add_column(title, justify="left" if title == "policy" else "right")
    for row in rows:
        table.add_row(*[fmt.format(row[key]) for key, _, fmt in COLUMNS])
    console = console or Console()
    if console.width < 130:
        console = Console(width=130)
    console.print(table)
    if any(row["reuse_ratio"] == 0 for row in rows[1:]):
        console.print(
            "Note: a policy with 0% reuse found nothing it judged safe to reuse. With random weights (the tiny\n"
            "presets) attention entropy does not fall with depth, so the entropy-adaptive schedule of vla-cache\n"
            "reuses nothing; trained checkpoints behave as in the paper. See docs/ARCHITECTURE.md."
        )

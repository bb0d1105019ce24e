"""Append-only JSONL of finished episodes: every episode is on disk the moment it ends."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable


def record_key(record: dict) -> str:
    return f"{record['policy']}::{record['task']}|{record['init_state']}|{record['seed']}"


class ResultStore:
    """One JSONL file of episode records. A re-run skips what is already recorded; a line torn by a crash or
    Ctrl-C during the write is ignored (that episode simply runs again)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict) -> None:
        line = json.dumps(record, allow_nan=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def records(self) -> list[dict]:
        return load_records([self.path])

    def done_keys(self) -> set[str]:
        return {record_key(r) for r in self.records()}


def load_records(paths: Iterable[Path]) -> list[dict]:
    """Every complete record of the given JSONL files, later duplicates of an episode replacing earlier ones."""
    merged: dict[str, dict] = {}
    for path in paths:
        if not Path(path).exists():
            continue
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            merged[record_key(record)] = record
    return list(merged.values())

"""The files of an output directory, made so that results can never be mixed up or lost.

- `episodes[.rankN].jsonl` (`ResultStore`): one line per finished episode, fsynced the moment it ends. A line
  torn by a crash mid-write is moved to `<file>.torn` with a warning before the next append: never glued to
  the next record, never silently dropped. `load_records` keeps the latest attempt of every episode.
- `run.json` (fingerprint.py) and `run.lock` (lock.py): what decided the results, and who writes them now.
- `move_aside`: `vlacache run --restart` moves the previous results into `restarted-<time>/`, never deletes.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Iterable

from ..errors import VlacacheError
from ..messages import note, warn  # noqa: F401  (the eval room imports them from here)
from ..types import InputError

MANIFEST_NAME = "run.json"
RECORD_FIELDS = ("policy", "task", "init_state", "seed")
# what `--restart` moves aside: only files vlacache writes, never anything else a user keeps there
RESULT_PATTERNS = ("episodes*.jsonl", "episodes*.jsonl.torn", MANIFEST_NAME, "summary.md", "summary.csv",
                   "summary.png", "videos")
SUMMARY_FILES = ("summary.md", "summary.csv", "summary.png")


class ResultsConflict(InputError):
    """The output directory holds results this run must not touch or mix with (another run's lock, results
    of a different configuration); the message says what and how to proceed."""


# -- episode records ------------------------------------------------------------------------------------------

def record_key(record: dict) -> str:
    return f"{record['policy']}::{record['task']}|{record['init_state']}|{record['seed']}"


def attempts(record: dict) -> int:
    """How many times this episode has been run (records written before retries existed: 1)."""
    return int(record.get("attempts") or 1)


def _parse(raw: bytes, fields: tuple[str, ...] = RECORD_FIELDS) -> dict | None:
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and all(k in record for k in fields) else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes, mode: str = "wb") -> None:
    """Write (mode "wb") or append ("ab") `data` and fsync it before returning."""
    with open(path, mode) as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


class ResultsUnwritable(VlacacheError, OSError):
    """The results file stopped accepting records (disk full, folder removed or made read-only)."""


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write_synced(tmp, data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def repair_jsonl(path: str | Path, fields: tuple[str, ...] = RECORD_FIELDS) -> Path | None:
    """Move every line of `path` that is not a complete record (a JSON object holding `fields`; a crash
    mid-write leaves a torn last line) to `<path>.torn`, with a warning; return that file, or None when nothing
    was torn. A complete last record that only lacks its newline gets one."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ResultsUnwritable(f"cannot read the results file {path} ({_reason(error)}); move it aside or pass a new "
                                "output_dir=...") from None
    if not data:
        return None
    good, torn = [], []
    for raw in data.split(b"\n"):
        if raw.strip():
            (good if _parse(raw, fields) is not None else torn).append(raw)
    if not torn:
        if not data.endswith(b"\n"):
            write_synced(path, b"\n", "ab")
        return None
    aside = path.with_name(path.name + ".torn")
    write_synced(aside, b"".join(raw + b"\n" for raw in torn), "ab")
    write_atomic(path, b"".join(raw + b"\n" for raw in good))
    warn(f"{path}: {len(torn)} torn line(s) (written when a run was killed mid-write) moved to {aside}; "
         f"those episodes run again")
    return aside


class ResultStore:
    """One JSONL file of records holding `fields` (default: episode results), appended to by one process. Before
    its first append it repairs the file (`repair_jsonl`), so a record is never glued onto a torn line."""

    def __init__(self, path: str | Path, fields: tuple[str, ...] = RECORD_FIELDS) -> None:
        self.path, self.fields = Path(path), fields
        self._repaired = False

    def append(self, record: dict) -> None:
        missing = [k for k in self.fields if k not in record]
        if missing:
            raise ValueError(f"a record for {self.path} lacks {missing}")
        try:
            if not self._repaired:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                repair_jsonl(self.path, self.fields)
                self._repaired = True
            write_synced(self.path, (json.dumps(record, allow_nan=True) + "\n").encode(), "ab")
        except OSError as error:
            raise ResultsUnwritable(
                f"cannot write results to {self.path} ({_reason(error)}); the episodes recorded before are kept there "
                "(this one is lost): make the folder writable again and re-run the same command, it resumes") from None

    def records(self) -> list[dict]:
        return load_records([self.path])


def _newer(a: dict, b: dict) -> bool:
    return (attempts(a), a.get("finished_at") or 0.0) >= (attempts(b), b.get("finished_at") or 0.0)


def load_records(paths: Iterable[Path], quiet: bool = False) -> list[dict]:
    """The latest attempt of every episode over the given JSONL files (most attempts, then latest finish).
    A line that is not a complete record is skipped with a warning naming the file (`repair_jsonl` moves such
    lines aside before a run appends)."""
    merged: dict[str, dict] = {}
    for path in paths:
        path = Path(path)
        if not path.exists():
            continue
        bad = 0
        for raw in path.read_bytes().split(b"\n"):
            if not raw.strip():
                continue
            record = _parse(raw)
            if record is None:
                bad += 1
                continue
            key = record_key(record)
            if key not in merged or _newer(record, merged[key]):
                merged[key] = record
        if bad and not quiet:
            warn(f"{path}: skipped {bad} torn line(s); the next `vlacache run` on this directory moves them to "
                 f"{path.name}.torn")
    return list(merged.values())


def result_files(out: Path) -> list[Path]:
    return sorted(out.glob("episodes*.jsonl"))


# -- writability ----------------------------------------------------------------------------------------------

def _reason(error: OSError) -> str:
    where = f": {error.filename}" if error.filename else ""
    return f"{error.strerror or error}{where}"


def check_writable_dir(out: Path, hint: str = "pass a writable output_dir=...") -> None:
    """Create `out` if needed and prove that files in it can be created and the result files appended to."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".vlacache-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
        for path in [*result_files(out), out / MANIFEST_NAME, *(out / name for name in SUMMARY_FILES)]:
            if path.is_file():
                with open(path, "ab"):
                    pass
    except OSError as error:
        raise InputError(f"cannot write to output_dir {out} ({_reason(error)}); {hint}") from None


def check_writable_file(path: str | Path, what: str, hint: str) -> Path:
    """Prove that `path` can be written (creating its folder); nothing is left behind that was not there."""
    path = Path(path)
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "Is a directory", str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        with open(path, "ab"):
            pass
        if not existed:
            path.unlink()
    except OSError as error:
        raise InputError(f"cannot write {what} {path} ({_reason(error)}); {hint}") from None
    return path


def move_aside(out: Path) -> Path | None:
    """Move the results vlacache wrote in `out` into a new `out/restarted-<time>/`; return it (None: nothing
    to move). Nothing is deleted."""
    items = sorted({p for pattern in RESULT_PATTERNS for p in out.glob(pattern)})
    if not items:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = out / f"restarted-{stamp}"
    n = 1
    while dest.exists():
        n += 1
        dest = out / f"restarted-{stamp}-{n}"
    dest.mkdir()
    for item in items:
        os.replace(item, dest / item.name)
    _fsync_dir(out)
    return dest

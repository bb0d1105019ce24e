"""`run.lock`: one vlacache run per output directory.

The lock names its holder (pid, host, start time, command); the processes of ONE sharded run share it through a
run token; a lock left by a process that no longer runs on this host is taken over with a message.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..types import InputError
from .results import ResultsConflict, _reason, warn, write_atomic, write_synced

LOCK_NAME = "run.lock"


def run_token(world: int = 1) -> str:
    """Identifies ONE run across its processes. Processes started by Fabric inherit VLACACHE_RUN_TOKEN from the
    process that took the lock; processes started by a cluster launcher share its job / rendezvous identity."""
    env = os.environ
    if env.get("VLACACHE_RUN_TOKEN"):
        return env["VLACACHE_RUN_TOKEN"]
    if world > 1:
        if env.get("SLURM_JOB_ID"):
            return f"slurm:{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '')}"
        if env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
            return f"dist:{env['MASTER_ADDR']}:{env['MASTER_PORT']}:{env.get('TORCHELASTIC_RUN_ID', '')}"
    return uuid.uuid4().hex


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def _read_lock(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) else None


def _holder(info: dict) -> str:
    return f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}"


def _create_exclusive(path: Path, data: bytes) -> None:
    """Create `path` holding `data`, atomically; FileExistsError when it exists."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    write_synced(tmp, data)
    try:
        os.link(tmp, path)  # fails if `path` exists; never shows a half-written file
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        tmp.unlink(missing_ok=True)


def _take_over(path: Path, stale: dict, data: bytes) -> bool:
    """Replace the stale lock `stale` with ours, exclusively: takeovers serialise on an fcntl lock of a guard file
    beside it, and only the first to find the lock still `stale` replaces it (the others then see a live holder).
    A new lock is never created while the stale one exists, so creation cannot race a takeover."""
    import fcntl

    with open(path.with_name(f".{path.name}.takeover"), "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if _read_lock(path) != stale:
            return False
        write_atomic(path, data)
        return True


@dataclass
class OutputLock:
    """`run.lock` of an output directory. `owner`: this process created it (and releases it); otherwise this
    process joined the run that holds it (another rank of the same run)."""

    path: Path
    token: str
    owner: bool

    def release(self) -> None:
        if self.owner and (_read_lock(self.path) or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def acquire_lock(out: Path, token: str) -> OutputLock:
    """Take `out/run.lock`, join it when it carries this run's token, or refuse naming the process that holds
    it. A lock of a process that no longer runs on this host is taken over with a message."""
    path = out / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
          "token": token, "command": " ".join(sys.argv)}
    data = json.dumps(me, indent=1).encode()
    for _ in range(20):
        try:
            _create_exclusive(path, data)
            return OutputLock(path, token, owner=True)
        except FileExistsError:
            pass
        except OSError as error:
            raise InputError(f"cannot write to output_dir {out} ({_reason(error)}); pass a writable output_dir=...") from None
        other = _read_lock(path)
        if other is None:  # removed meanwhile, or not a lock we wrote
            if path.exists():
                time.sleep(0.1)
                if _read_lock(path) is None and path.exists():
                    raise ResultsConflict(
                        f"{path} exists but is not a readable vlacache lock; if no other run uses {out}, delete it, "
                        f"or pass a new output_dir=...")
            continue
        if other.get("token") == token:
            return OutputLock(path, token, owner=False)
        same_host = other.get("host") == me["host"]
        pid = other.get("pid")
        stale = same_host and isinstance(pid, int) and (pid == me["pid"] or not _pid_alive(pid))
        if not stale:
            raise ResultsConflict(
                f"output_dir {out} is in use by another vlacache run ({_holder(other)}; lock {path}); wait for it "
                f"to finish or pass a new output_dir=... (if that process is gone, delete {path})")
        if _take_over(path, other, data):
            warn(f"took over the stale lock {path} of {_holder(other)}: that process no longer runs")
            return OutputLock(path, token, owner=True)
    raise ResultsConflict(f"could not take the lock {path}: other processes keep changing it; pass a new output_dir=...")

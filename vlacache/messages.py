"""One-line messages to the user on stderr, prefixed `vlacache:` (progress notes and warnings; errors are the CLI's)."""

from __future__ import annotations

import sys


def note(message: str) -> None:
    print(f"vlacache: {message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    print(f"vlacache: warning: {message}", file=sys.stderr, flush=True)

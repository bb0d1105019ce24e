"""A checkpoint directory's list of file hashes (`SHA256SUMS`, in `sha256sum`'s format, so `sha256sum -c SHA256SUMS`
checks it too). The shipped policies and every `vlacache train` export carry one; loading a directory that has one
checks every file, so a changed byte is caught. Without one, loading catches structural damage only (missing
files and keys, shapes, dtypes, truncated files), not a changed byte inside a tensor."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .errors import CheckpointError

MANIFEST_FILE = "SHA256SUMS"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(ckpt_dir: str | os.PathLike[str]) -> Path:
    """List the sha256 of every file of a checkpoint directory (dot-files and the list itself left out)."""
    root = Path(ckpt_dir)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_FILE and not p.name.startswith("."))
    (root / MANIFEST_FILE).write_text("".join(f"{sha256_file(p)}  {p.relative_to(root).as_posix()}\n" for p in files))
    return root / MANIFEST_FILE


def verify_manifest(ckpt_dir: str | os.PathLike[str]) -> bool:
    """Check every file the directory's MANIFEST_FILE lists (CheckpointError naming the first missing or changed
    one); False when the directory has no list."""
    root = Path(ckpt_dir)
    manifest = root / MANIFEST_FILE
    if not manifest.is_file():
        return False
    for number, line in enumerate(manifest.read_text().splitlines(), 1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            raise CheckpointError(f"{manifest} line {number} is not '<sha256>  <file>'; restore the checkpoint's "
                                  f"{MANIFEST_FILE} (or delete it to load without the check)")
        path = root / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: {MANIFEST_FILE} lists it; restore the checkpoint directory")
        if sha256_file(path) != digest:
            raise CheckpointError(f"{path} differs from its {MANIFEST_FILE} entry: the file is corrupted or was "
                                  "changed; restore it from the released checkpoint")
    return True

"""SHA-256 of a model's weight files for its fingerprint, hashed in parallel threads.

A 70B model is ~140 GB in ~30 files; rank 0 hashes them while the other ranks wait in a collective, so
the files are hashed by several threads at once (hashlib releases the GIL while it hashes).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MAX_THREADS = 8


def file_digest(path: Path) -> str:
    """The file's SHA-256 hex digest."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def file_digests(paths: Sequence[Path]) -> list[str]:
    """``file_digest`` of each path, in order, hashed by up to MAX_THREADS threads."""
    if len(paths) <= 1:
        return [file_digest(p) for p in paths]
    with ThreadPoolExecutor(min(MAX_THREADS, len(paths))) as pool:
        return list(pool.map(file_digest, paths))

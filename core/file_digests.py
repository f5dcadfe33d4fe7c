"""SHA-256 of weight files for the model fingerprint: files hashed in parallel, each remembered per (inode, size, mtime).

A 70B model is ~140 GB in ~30 files; rank 0 hashes them while the other ranks wait in a collective, so
the files are hashed by several threads (hashlib releases the GIL) and a file this process has hashed
before, unchanged since, is not read again (the warm Ray workers run job after job).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MAX_THREADS = 8
MEMO_LIMIT = 4096
_memo: dict[tuple[str, int, int, int], str] = {}
_lock = threading.Lock()


def file_digest(path: Path) -> str:
    """The file's SHA-256 hex digest; from memory when this process hashed the same unchanged file before."""
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    with _lock:
        known = _memo.get(key)
    if known is not None:
        return known
    with path.open("rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    with _lock:
        if len(_memo) >= MEMO_LIMIT:
            _memo.clear()
        _memo[key] = digest
    return digest


def file_digests(paths: Sequence[Path]) -> list[str]:
    """``file_digest`` of each path, in order, hashed by up to MAX_THREADS threads."""
    if len(paths) <= 1:
        return [file_digest(p) for p in paths]
    with ThreadPoolExecutor(min(MAX_THREADS, len(paths))) as pool:
        return list(pool.map(file_digest, paths))

"""Sortable public ids: `job_<ulid>` for jobs, `ds_<sha256 prefix>` for content-addressed datasets."""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = (
    "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case; sorts like the numbers it encodes
)
_lock = threading.Lock()
_last_ms = 0
_last_rand = 0


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_ulid() -> str:
    """A 26-character ULID (48-bit milliseconds + 80 random bits), monotonic within this process."""
    global _last_ms, _last_rand
    with _lock:
        now_ms = time.time_ns() // 1_000_000
        if now_ms <= _last_ms:
            now_ms = _last_ms
            rand = (_last_rand + 1) & ((1 << 80) - 1)
        else:
            rand = int.from_bytes(os.urandom(10), "big")
        _last_ms, _last_rand = now_ms, rand
    return _encode(now_ms, 10) + _encode(rand, 16)


def new_job_id() -> str:
    """A new job id, e.g. ``job_01hz3m5k8q9t0v1w2x3y4z5a6b`` (sortable by creation time)."""
    return "job_" + new_ulid()


def dataset_id(sha256_hex: str) -> str:
    """The content-addressed id of a dataset file: ``ds_`` and the first 32 hex digits of its SHA-256."""
    digest = sha256_hex.lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError("sha256 must be 64 hex digits")
    return "ds_" + digest[:32]

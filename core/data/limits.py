"""Limits on dataset input (decompressed size, line length, JSON nesting) that the readers enforce while streaming."""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import accumulate, count
from operator import sub

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class DataLimits:
    """What one dataset file may hold; the service sets them from MINORDPO_MAX_* settings.

    ``max_dataset_bytes``: bytes of one file after decompression (gzip), counted as it is read.
    ``max_line_bytes``: bytes of one JSONL line (the newline not counted); a longer line is never held whole.
    ``max_json_bytes``: bytes of a whole-array ``.json`` file, which is parsed in memory (use JSONL beyond it).
    ``max_json_depth``: nesting of arrays and objects in one row; deeper rows are bad rows, never parsed.
    """

    max_dataset_bytes: int = 2048 * MIB
    max_line_bytes: int = 2 * MIB
    max_json_bytes: int = 256 * MIB
    max_json_depth: int = 100


DEFAULT_LIMITS = DataLimits()

# A JSON string (quotes and escapes inside it included), in the unrolled form that `re` scans without backtracking.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_AS_STEPS = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")


def _steps(raw: bytes) -> bytes:
    """The brackets of ``raw`` outside JSON strings, each open as 2 and each close as 0."""
    outside_strings = _STRING.sub(b"", raw) if b'"' in raw else raw
    return outside_strings.translate(None, _NOT_BRACKETS).translate(_AS_STEPS)


def _peak(steps: bytes) -> int:
    # depth after i+1 brackets = sum of steps so far - (i+1), since an open adds 2-1 and a close 0-1
    return max(map(sub, accumulate(steps), count(1))) if steps else 0


def json_depth(raw: bytes, limit: int) -> int:
    """Deepest nesting of arrays/objects in ``raw`` JSON text, brackets inside strings not counted.

    Cheap when the text holds at most ``limit`` brackets (returns that count, an upper bound); else the
    exact peak of the running balance of brackets (what a recursive parser would descend to), computed
    without a Python-level loop over the bytes.
    """
    brackets = raw.count(b"[") + raw.count(b"{")
    if brackets <= limit:
        return brackets
    return max(0, _peak(_steps(raw)))


def too_deep_line(raw: bytes, limit: int) -> int | None:
    """The 1-based line of ``raw`` on which the nesting first goes past ``limit``; None if it never does.

    Lines are scanned one by one (a JSON string cannot span lines), carrying the depth across them.
    """
    depth = 0
    for number, line in enumerate(raw.split(b"\n"), start=1):
        steps = _steps(line)
        if depth + _peak(steps) > limit:
            return number
        depth += steps.count(2) - steps.count(0)
    return None

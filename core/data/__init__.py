"""Preference data layer: read files, normalise formats, tokenise, truncate, split, batch by length.

Names load lazily (PEP 562), so `core.data.report` and the spec stay importable without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LengthGroupedBatches": "core.data.batching",
    "EncodedPair": "core.data.encode",
    "encode_batch": "core.data.encode",
    "encode_pair": "core.data.encode",
    "truncate_ids": "core.data.encode",
    "ROW_ERROR_KINDS": "core.data.errors",
    "DatasetError": "core.data.errors",
    "RowError": "core.data.errors",
    "FORMATS": "core.data.formats",
    "PreferenceText": "core.data.formats",
    "detect_format": "core.data.formats",
    "normalise": "core.data.formats",
    "split_implicit_prompt": "core.data.formats",
    "PreparedData": "core.data.prepare",
    "fingerprint": "core.data.prepare",
    "prepare_data": "core.data.prepare",
    "split_indices": "core.data.prepare",
    "tokenizer_identity": "core.data.prepare",
    "read_rows": "core.data.readers",
    "LengthStats": "core.data.report",
    "SkippedRow": "core.data.report",
    "TokenLengths": "core.data.report",
    "ValidationReport": "core.data.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'core.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

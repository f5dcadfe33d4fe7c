"""Preference data layer: read files, normalise formats, tokenise, truncate, split, batch by length."""

from core.data.batching import LengthGroupedBatches
from core.data.encode import EncodedPair, encode_batch, encode_pair, truncate_ids
from core.data.errors import ROW_ERROR_KINDS, DatasetError, RowError
from core.data.formats import FORMATS, PreferenceText, detect_format, normalise, split_implicit_prompt
from core.data.prepare import PreparedData, fingerprint, prepare_data, split_indices, tokenizer_identity
from core.data.readers import read_rows
from core.data.report import LengthStats, SkippedRow, TokenLengths, ValidationReport

__all__ = [
    "FORMATS",
    "ROW_ERROR_KINDS",
    "DatasetError",
    "EncodedPair",
    "LengthGroupedBatches",
    "LengthStats",
    "PreferenceText",
    "PreparedData",
    "RowError",
    "SkippedRow",
    "TokenLengths",
    "ValidationReport",
    "detect_format",
    "encode_batch",
    "encode_pair",
    "fingerprint",
    "normalise",
    "prepare_data",
    "read_rows",
    "split_implicit_prompt",
    "split_indices",
    "tokenizer_identity",
    "truncate_ids",
]

"""prepare_data: read, normalise, encode, split and fingerprint a DatasetSpec's data, with its report."""

from __future__ import annotations

import hashlib
import json
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.data.encode import EncodedPair, RawLengths, encode_batch
from core.data.errors import DatasetError, RowError
from core.data.formats import PreferenceText, detect_format, normalise, require_chat_template
from core.data.hub import default_resolver
from core.data.limits import DEFAULT_LIMITS, DataLimits
from core.data.readers import read_rows
from core.data.report import MAX_SKIPPED_LISTED, LengthStats, SkippedRow, TokenLengths, ValidationReport

FINGERPRINT_VERSION = "minordpo-data-v1"
_ENCODE_CHUNK = 512
# Text handed to one tokenizer call, whatever the row count: tokenizing needs many times the text's size in memory (bench/README.md).
_ENCODE_CHUNK_CHARS = 4 * 1024 * 1024
_CHAT_FORMATS = ("conversational", "openai")


@dataclass
class PreparedData:
    """Encoded train and eval pairs, the validation report, and the cache key of the encoded data."""

    train: list[EncodedPair]
    eval: list[EncodedPair]
    report: ValidationReport
    fingerprint: str


@dataclass
class _Loaded:
    shown: str
    format: str
    pairs: list[EncodedPair] = field(default_factory=list)
    raw: list[RawLengths] = field(default_factory=list)
    errors: list[tuple[int, RowError]] = field(default_factory=list)


def _load(
    source: str,
    path: str | Path,
    fmt: str,
    tokenizer: Any,
    max_length: int,
    *,
    truncate_prompt: bool,
    fail: bool,
    max_rows: int | None,
    limits: DataLimits = DEFAULT_LIMITS,
) -> _Loaded:
    """Read one file; in auto mode the first row that normalises cleanly fixes the format for the rest."""
    locked = None if fmt == "auto" else fmt
    if locked in _CHAT_FORMATS:
        _with_path(require_chat_template, source, tokenizer)
    out = _Loaded(shown=source, format=locked or "auto")
    texts: list[PreferenceText] = []
    lines: list[int] = []
    pending_chars = 0

    def flush() -> None:
        nonlocal pending_chars
        pending_chars = 0
        results = (
            encode_batch(texts, tokenizer, max_length, truncate_prompt=truncate_prompt, lines=lines)
            if texts
            else []
        )
        for line, (result, raw) in zip(lines, results, strict=True):
            if isinstance(result, RowError):
                out.errors.append((line, result))
            else:
                out.pairs.append(result)
                out.raw.append(raw)
        texts.clear()
        lines.clear()
        if fail and out.errors:
            line, err = min(out.errors, key=lambda item: item[0])
            raise DatasetError.from_row(err, path=source, line=line)

    for line, row in read_rows(path, limits):
        if isinstance(row, RowError):
            out.errors.append((line, row))
        else:
            try:
                text = _with_path(normalise, source, row, locked or "auto", tokenizer)
                if locked is None:
                    locked = out.format = detect_format(row)
            except RowError as err:
                out.errors.append((line, err))
            else:
                texts.append(text)
                lines.append(line)
                pending_chars += len(text.prompt) + len(text.chosen) + len(text.rejected)
        if (fail and out.errors) or len(texts) >= _ENCODE_CHUNK or pending_chars >= _ENCODE_CHUNK_CHARS:
            flush()
        if max_rows is not None and len(out.pairs) + len(texts) >= max_rows:
            flush()
            if len(out.pairs) >= max_rows:
                break
    if texts:
        flush()
    if max_rows is not None and len(out.pairs) > max_rows:
        last = out.pairs[max_rows - 1].line
        out.pairs, out.raw = out.pairs[:max_rows], out.raw[:max_rows]
        out.errors = [(line, err) for line, err in out.errors if line < last]
    out.errors.sort(key=lambda item: item[0])
    if not out.pairs:
        raise DatasetError(_no_usable_rows(out), path=source)
    return out


def _with_path(fn: Callable[..., Any], source: str, *args: Any) -> Any:
    try:
        return fn(*args)
    except DatasetError as err:
        if err.path is not None:
            raise
        raise DatasetError(err.reason, path=source, line=err.line, kind=err.kind) from err


def _no_usable_rows(loaded: _Loaded) -> str:
    if not loaded.errors:
        return "no usable rows: the file has no rows"
    kinds = Counter(err.kind for _, err in loaded.errors)
    summary = ", ".join(f"{kind} {count}" for kind, count in kinds.most_common())
    line, first = loaded.errors[0]
    return f"no usable rows: all {len(loaded.errors)} rows skipped ({summary}); first: line {line}: {first.reason}"


def _split_seed(seed: int) -> int:
    digest = hashlib.sha256(f"eval-split:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, eval) index lists, each ascending; eval gets round(n * fraction) rows, at least 1.

    The train side always keeps at least one row; with fewer than two rows there is no eval split.
    """
    if eval_fraction <= 0 or n < 2:
        return list(range(n)), []
    n_eval = min(max(1, round(n * eval_fraction)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(_split_seed(seed))).tolist()
    held = set(perm[:n_eval])
    return [i for i in range(n) if i not in held], sorted(held)


def tokenizer_identity(tokenizer: Any) -> str:
    """sha256 of the tokenizer's serialized form (vocab, merges, normaliser, added tokens) and special tokens."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {
        "class": type(tokenizer).__name__,
        "bos": getattr(tokenizer, "bos_token_id", None),
        "eos": getattr(tokenizer, "eos_token_id", None),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def fingerprint(
    train: Sequence[EncodedPair],
    eval_pairs: Sequence[EncodedPair],
    tokenizer: Any,
    max_length: int,
    *,
    truncate_prompt: bool = True,
) -> str:
    """Cache key of encoded data: tokenizer identity, truncation settings and every pair's token ids."""
    h = hashlib.sha256()
    settings = {"v": FINGERPRINT_VERSION, "max_length": max_length, "truncate_prompt": truncate_prompt}
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(tokenizer_identity(tokenizer).encode())
    for tag, pairs in ((b"train", train), (b"eval", eval_pairs)):
        h.update(tag + len(pairs).to_bytes(8, "little"))
        for pair in pairs:
            for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
                h.update(len(ids).to_bytes(4, "little"))
                h.update(array("q", ids).tobytes())
    return h.hexdigest()


def _report(
    train_src: _Loaded,
    eval_src: _Loaded | None,
    train: list[EncodedPair],
    eval_pairs: list[EncodedPair],
    **kw: Any,
) -> ValidationReport:
    errors = [(line, err, "train") for line, err in train_src.errors]
    if eval_src is not None:
        errors += [(line, err, "eval") for line, err in eval_src.errors]
    raw = train_src.raw + (eval_src.raw if eval_src is not None else [])
    used = len(train) + len(eval_pairs)
    truncated = sum(p.truncated for p in train) + sum(p.truncated for p in eval_pairs)
    lengths = TokenLengths(
        prompt=LengthStats.of([r.prompt for r in raw]),
        chosen=LengthStats.of([r.chosen for r in raw]),
        rejected=LengthStats.of([r.rejected for r in raw]),
        total=LengthStats.of([r.prompt + max(r.chosen, r.rejected) for r in raw]),
    )
    return ValidationReport(
        path=train_src.shown,
        eval_path=eval_src.shown if eval_src is not None else None,
        format=train_src.format,
        rows_total=used + len(errors),
        rows_used=used,
        rows_skipped=len(errors),
        skipped=[
            SkippedRow(line=line, reason=err.reason, kind=err.kind, split=split)
            for line, err, split in errors[:MAX_SKIPPED_LISTED]
        ],
        skipped_by_reason=dict(Counter(err.kind for _, err, _ in errors)),
        train_rows=len(train),
        eval_rows=len(eval_pairs),
        truncated_rows=truncated,
        truncation_rate=truncated / used if used else 0.0,
        token_lengths=lengths,
        **kw,
    )


def prepare_data(
    spec: Any,
    tokenizer: Any,
    max_length: int,
    seed: int,
    *,
    resolve_path: Callable[[str], str | Path] | None = None,
    limits: DataLimits = DEFAULT_LIMITS,
) -> PreparedData:
    """Read and encode ``spec.train`` (and ``spec.eval``), honouring format, on_bad_row, max_rows and the eval split.

    ``spec`` is a core.spec.DatasetSpec. ``resolve_path`` maps a spec path or uploaded dataset id to a
    local path (default: the string as given, relative to the working directory, and `hf:OWNER/NAME`
    loaded through core.data.hub into `<artifacts_dir>/hub-datasets`); errors name the
    string from the spec. Raises DatasetError for a missing or unreadable file, a file over ``limits``,
    a file with no usable rows, a tokenizer that cannot render chat data, or (on_bad_row="fail") the
    first bad row; never RecursionError, whatever the data holds.
    """
    try:
        return _prepare(spec, tokenizer, max_length, seed, resolve_path or default_resolver(spec), limits)
    except RecursionError as exc:  # a last guard: the readers refuse deep rows before anything recurses
        raise DatasetError("the data is nested too deeply to read", path=spec.train) from exc


def _prepare(
    spec: Any,
    tokenizer: Any,
    max_length: int,
    seed: int,
    resolve: Callable[[str], str | Path],
    limits: DataLimits,
) -> PreparedData:
    truncate_prompt = bool(getattr(spec, "truncate_prompt", True))
    options = {"truncate_prompt": truncate_prompt, "fail": spec.on_bad_row == "fail", "limits": limits}
    train_src = _load(
        spec.train, resolve(spec.train), spec.format, tokenizer, max_length, max_rows=spec.max_rows, **options
    )
    eval_src = None
    if spec.eval:
        eval_src = _load(
            spec.eval,
            getattr(resolve, "for_eval", resolve)(spec.eval),
            spec.format,
            tokenizer,
            max_length,
            max_rows=None,
            **options,
        )
        train, eval_pairs = train_src.pairs, eval_src.pairs
    else:
        train_idx, eval_idx = split_indices(len(train_src.pairs), spec.eval_fraction, seed)
        train = [train_src.pairs[i] for i in train_idx]
        eval_pairs = [train_src.pairs[i] for i in eval_idx]
    report = _report(
        train_src, eval_src, train, eval_pairs, max_length=max_length, truncate_prompt=truncate_prompt
    )
    key = fingerprint(train, eval_pairs, tokenizer, max_length, truncate_prompt=truncate_prompt)
    return PreparedData(train=train, eval=eval_pairs, report=report, fingerprint=key)

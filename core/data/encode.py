"""Tokenise normalised pairs in batches and truncate them to max_length (keep prompt end, completion start)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from core.data.errors import NO_ROOM, RowError
from core.data.formats import PreferenceText

_CHUNK = 1024  # texts per tokenizer call: fast batching without holding everything twice


@dataclass(frozen=True, slots=True)
class EncodedPair:
    """One tokenised pair. Completions hold completion tokens only (EOS appended); all already truncated."""

    line: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool

    @property
    def length(self) -> int:
        """Longest sequence this pair makes: prompt plus the longer completion (for batching and padding)."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


class RawLengths(NamedTuple):
    """Token counts before truncation (special tokens and EOS included)."""

    prompt: int
    chosen: int
    rejected: int


def _tokenise(tokenizer: Any, texts: Sequence[str], *, add_special_tokens: bool) -> list[list[int]]:
    out: list[list[int]] = []
    for start in range(0, len(texts), _CHUNK):
        chunk = list(texts[start : start + _CHUNK])
        out.extend(tokenizer(chunk, add_special_tokens=add_special_tokens)["input_ids"])
    return out


def _dedupe_bos(ids: list[int], bos: int | None) -> list[int]:
    # A chat template that writes the BOS text itself, plus add_special_tokens=True, gives BOS twice.
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        return ids[1:]
    return ids


def _with_eos(ids: list[int], eos: int | None) -> list[int]:
    if eos is None or (ids and ids[-1] == eos):
        return ids
    return [*ids, eos]


def truncate_ids(
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    max_length: int,
    *,
    truncate_prompt: bool = True,
    keep_first: int = 0,
) -> tuple[list[int], list[int], list[int], bool]:
    """Fit ``prompt + completion <= max_length`` for both completions; returns the cut lists and whether anything was cut.

    P = len(prompt), C = max(len(chosen), len(rejected)). Nothing is cut when P + C <= max_length.
    Otherwise the prompt keeps its last min(P, max(max_length - C, max_length // 2)) tokens (or all
    of them when ``truncate_prompt`` is False, where P >= max_length is a RowError) and each
    completion keeps its first max_length - kept_prompt tokens. ``keep_first`` leading prompt tokens
    (the BOS) stay in front of a cut prompt, counted within kept_prompt.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    p, c = len(prompt), max(len(chosen), len(rejected))
    if p + c <= max_length:
        return prompt, chosen, rejected, False
    if truncate_prompt:
        kept = min(p, max(max_length - c, max_length // 2))
    else:
        if p >= max_length:
            raise RowError(
                f"no room for any completion token (prompt has {p} tokens, max_length {max_length}); "
                "raise max_length or set dataset.truncate_prompt",
                NO_ROOM,
            )
        kept = p
    room = max_length - kept
    tail = kept - keep_first
    kept_prompt = (
        prompt[:keep_first] + prompt[p - tail :] if 0 < tail < p - keep_first else prompt[p - kept :]
    )
    return kept_prompt, chosen[:room], rejected[:room], True


def encode_batch(
    texts: Sequence[PreferenceText],
    tokenizer: Any,
    max_length: int,
    *,
    truncate_prompt: bool = True,
    lines: Sequence[int] | None = None,
) -> list[tuple[EncodedPair | RowError, RawLengths]]:
    """Encode many pairs with three batched tokenizer calls; a row that cannot fit gives a RowError in its slot."""
    if lines is not None and len(lines) != len(texts):
        raise ValueError("lines must have one entry per text")
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    prompts = _tokenise(tokenizer, [t.prompt for t in texts], add_special_tokens=True)
    chosens = _tokenise(tokenizer, [t.chosen for t in texts], add_special_tokens=False)
    rejecteds = _tokenise(tokenizer, [t.rejected for t in texts], add_special_tokens=False)
    out: list[tuple[EncodedPair | RowError, RawLengths]] = []
    for i in range(len(texts)):
        prompt = _dedupe_bos(list(prompts[i]), bos)
        chosen, rejected = _with_eos(list(chosens[i]), eos), _with_eos(list(rejecteds[i]), eos)
        raw = RawLengths(len(prompt), len(chosen), len(rejected))
        line = lines[i] if lines is not None else 0
        try:
            p, c, r, cut = truncate_ids(
                prompt,
                chosen,
                rejected,
                max_length,
                truncate_prompt=truncate_prompt,
                keep_first=1 if bos is not None and prompt[:1] == [bos] else 0,
            )
        except RowError as err:
            out.append((err, raw))
            continue
        out.append((EncodedPair(line, p, c, r, cut), raw))
    return out


def encode_pair(
    text: PreferenceText, tokenizer: Any, max_length: int, *, truncate_prompt: bool = True, line: int = 0
) -> EncodedPair:
    """Encode one pair: prompt with special tokens, completions without them plus EOS, then truncate."""
    [(result, _)] = encode_batch([text], tokenizer, max_length, truncate_prompt=truncate_prompt, lines=[line])
    if isinstance(result, RowError):
        raise result
    return result

"""Pack preference pairs as `[prompt; chosen; rejected]` rows that share the prompt in one forward.

Each pair is laid out as the prompt once, then the chosen completion, then the rejected one. A block
attention mask lets chosen tokens see the prompt and earlier chosen tokens only, and rejected tokens
the prompt and earlier rejected tokens only; position ids restart after the prompt for the rejected
part. This equals two separate causal sequences (RoPE sees the same relative positions) while the
prompt, usually most of each HH-RLHF pair, is encoded once instead of twice.

A row may hold several short pairs one after another (``RowLayout``, rows planned by
core.data.batching.plan_rows): ``documents`` numbers the pairs of a row, attention never crosses
from one pair to another and position ids restart at 0 for each pair, so every pair is scored
exactly as in a row of its own. Per-pair tensors stay in batch order whatever the row layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Protocol

import torch
from torch import Tensor

from core.data.batching import plan_rows

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3


class PairTokens(Protocol):
    """What packing needs from an encoded pair (core.data.EncodedPair fits)."""

    prompt_ids: Sequence[int]
    chosen_ids: Sequence[int]
    rejected_ids: Sequence[int]


@dataclass
class PackedBatch:
    """Tensors for one forward over B pairs (see module docstring)."""

    input_ids: Tensor  # [R, T] R rows (R = B with one pair per row)
    position_ids: Tensor  # [R, T]
    segments: Tensor  # [R, T] PROMPT / CHOSEN / REJECTED / PAD
    documents: Tensor  # [R, T] which pair of its row a token belongs to (0, 1, ...); -1 on padding
    source_index: Tensor  # [N] flat row*T+col of the hidden state that predicts each completion token
    target_ids: Tensor  # [N] the completion token predicted there
    sequence_index: Tensor  # [N] 0..B-1 for chosen tokens of pair b, B..2B-1 for rejected ones
    chosen_lengths: Tensor  # [B] completion token counts
    rejected_lengths: Tensor  # [B]
    example_index: Tensor  # [B] dataset indices (to look up cached reference log-probs)

    @property
    def num_pairs(self) -> int:
        return int(self.chosen_lengths.numel())

    @property
    def num_tokens(self) -> int:
        return int((self.segments != PAD).sum())

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.num_tokens / max(1, self.segments.numel())

    def attention_mask(self, dtype: torch.dtype) -> Tensor:
        """Additive ``[R, 1, T, T]`` mask (0 = attend, dtype-min = blocked), valid for sdpa and eager attention."""
        seg, doc = self.segments, self.documents
        t = seg.shape[1]
        idx = torch.arange(t, device=seg.device)
        causal = idx[None, :, None] >= idx[None, None, :]
        seg_q, seg_k = seg[:, :, None], seg[:, None, :]
        same_pair = doc[:, :, None] == doc[:, None, :]
        allowed = causal & same_pair & ((seg_q == seg_k) | (seg_k == PROMPT)) & (seg_k != PAD)
        allowed |= torch.eye(t, dtype=torch.bool, device=seg.device)[None]  # padding rows see themselves
        mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[:, None]

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


@dataclass(frozen=True)
class RowLayout:
    """How the pairs of one batch fill rows: at most ``pairs_per_row`` (None: as many as fit) within ``max_length``.

    The default, one pair per row, is the plain layout. A pair wider than ``max_length`` keeps a row
    to itself. ``row_multiple`` is what the attention pads row widths to (core.attention.FLEX_BUCKET
    on the FlexAttention path); plan_rows weighs padding with it.
    """

    pairs_per_row: int | None = 1
    max_length: int | None = None
    row_multiple: int = 1

    def rows(self, pairs: Sequence[PairTokens]) -> list[list[int]]:
        """Positions into ``pairs`` that share each row."""
        widths = [pair_width(p) for p in pairs]
        return plan_rows(widths, self.max_length, self.pairs_per_row, multiple=self.row_multiple)

    def pack(self, pairs: Sequence[PairTokens], indices: Sequence[int], pad_id: int = 0) -> PackedBatch:
        return pack_pairs(pairs, indices, pad_id, rows=self.rows(pairs))


def pair_width(pair: PairTokens) -> int:
    """Tokens a pair takes in a packed row: prompt, chosen and rejected."""
    return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


def pack_pairs(
    pairs: Sequence[PairTokens],
    indices: Sequence[int],
    pad_id: int = 0,
    *,
    rows: Sequence[Sequence[int]] | None = None,
) -> PackedBatch:
    """Build one PackedBatch; every pair needs a non-empty prompt and completions.

    ``rows`` lists the positions into ``pairs`` laid out in each row, in that order (default: one
    pair per row); every pair appears exactly once.
    """
    b = len(pairs)
    rows = [[i] for i in range(b)] if rows is None else [list(r) for r in rows]
    if sorted(i for r in rows for i in r) != list(range(b)) or not all(rows):
        raise ValueError(f"rows must place each of the {b} pairs exactly once, in non-empty rows")
    if len(indices) != b:
        raise ValueError(f"{b} pairs but {len(indices)} example indices")
    width = max(sum(pair_width(pairs[i]) for i in r) for r in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segments = torch.full(shape, PAD, dtype=torch.long)
    documents = torch.full(shape, -1, dtype=torch.long)
    source: list[tuple[int, int]] = [(0, 0)] * (2 * b)  # chosen then rejected: (prompt end, start) offsets
    for row, members in enumerate(rows):
        at = row * width
        for doc, i in enumerate(members):
            source[i], source[b + i] = _place(pairs[i], at, doc, input_ids, position_ids, segments, documents)
            at += pair_width(pairs[i])
        used = at - row * width
        position_ids[row, used:] = torch.arange(width - used)
    src: list[int] = []
    tgt: list[int] = []
    seq: list[int] = []
    for s, completion in enumerate([p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]):
        # token k of a completion is predicted by the state before it: the prompt's last token, then token k-1
        prompt_end, start = source[s]
        src.extend([prompt_end, *range(start, start + len(completion) - 1)])
        tgt.extend(completion)
        seq.extend([s] * len(completion))
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        segments=segments,
        documents=documents,
        source_index=torch.tensor(src, dtype=torch.long),
        target_ids=torch.tensor(tgt, dtype=torch.long),
        sequence_index=torch.tensor(seq, dtype=torch.long),
        chosen_lengths=torch.tensor([len(p.chosen_ids) for p in pairs], dtype=torch.long),
        rejected_lengths=torch.tensor([len(p.rejected_ids) for p in pairs], dtype=torch.long),
        example_index=torch.tensor(list(indices), dtype=torch.long),
    )


def _place(pair: PairTokens, at: int, doc: int, *rows: Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
    """Write pair number ``doc`` of its row at flat offset ``at`` of the input, position, segment and document rows.

    Returns, for chosen and rejected, (the prompt's last token, the completion's first token).
    """
    p, c, r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
    if p == 0 or c == 0 or r == 0:
        raise ValueError("a packed pair needs a non-empty prompt, chosen and rejected completion")
    flat_ids, flat_pos, flat_seg, flat_doc = (x.view(-1) for x in rows)
    flat_ids[at : at + p + c + r] = torch.tensor([*pair.prompt_ids, *pair.chosen_ids, *pair.rejected_ids])
    flat_pos[at : at + p + c] = torch.arange(p + c)
    flat_pos[at + p + c : at + p + c + r] = torch.arange(p, p + r)
    flat_seg[at : at + p] = PROMPT
    flat_seg[at + p : at + p + c] = CHOSEN
    flat_seg[at + p + c : at + p + c + r] = REJECTED
    flat_doc[at : at + p + c + r] = doc
    prompt_end = at + p - 1
    return (prompt_end, at + p), (prompt_end, at + p + c)

"""Pack preference pairs as `[prompt; chosen; rejected]` rows that share the prompt in one forward.

Each row holds the prompt once, then the chosen completion, then the rejected one. A block
attention mask lets chosen tokens see the prompt and earlier chosen tokens only, and rejected tokens
the prompt and earlier rejected tokens only; position ids restart after the prompt for the rejected
part. This equals two separate causal sequences (RoPE sees the same relative positions) while the
prompt, usually most of each HH-RLHF pair, is encoded once instead of twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Protocol

import torch
from torch import Tensor

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3


class PairTokens(Protocol):
    """What packing needs from an encoded pair (core.data.EncodedPair fits)."""

    prompt_ids: Sequence[int]
    chosen_ids: Sequence[int]
    rejected_ids: Sequence[int]


@dataclass
class PackedBatch:
    """Tensors for one forward over B pairs (see module docstring)."""

    input_ids: Tensor  # [B, T]
    position_ids: Tensor  # [B, T]
    segments: Tensor  # [B, T] PROMPT / CHOSEN / REJECTED / PAD
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
        """Additive ``[B, 1, T, T]`` mask (0 = attend, dtype-min = blocked), valid for sdpa and eager attention."""
        seg = self.segments
        t = seg.shape[1]
        idx = torch.arange(t, device=seg.device)
        causal = idx[None, :, None] >= idx[None, None, :]
        seg_q, seg_k = seg[:, :, None], seg[:, None, :]
        allowed = causal & ((seg_q == seg_k) | (seg_k == PROMPT)) & (seg_k != PAD)
        allowed |= torch.eye(t, dtype=torch.bool, device=seg.device)[None]  # padding rows see themselves
        mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[:, None]

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def pack_pairs(pairs: Sequence[PairTokens], indices: Sequence[int], pad_id: int = 0) -> PackedBatch:
    """Build one PackedBatch; every pair needs a non-empty prompt and completions."""
    width = max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    b = len(pairs)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((b, width), dtype=torch.long)
    segments = torch.full((b, width), PAD, dtype=torch.long)
    src_c: list[int] = []
    tgt_c: list[int] = []
    seq_c: list[int] = []
    src_r: list[int] = []
    tgt_r: list[int] = []
    seq_r: list[int] = []
    for row, pair in enumerate(pairs):
        p, c, r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        if p == 0 or c == 0 or r == 0:
            raise ValueError("a packed pair needs a non-empty prompt, chosen and rejected completion")
        input_ids[row, : p + c + r] = torch.tensor([*pair.prompt_ids, *pair.chosen_ids, *pair.rejected_ids])
        position_ids[row, : p + c] = torch.arange(p + c)
        position_ids[row, p + c : p + c + r] = torch.arange(p, p + r)
        position_ids[row, p + c + r :] = torch.arange(width - (p + c + r))
        segments[row, :p] = PROMPT
        segments[row, p : p + c] = CHOSEN
        segments[row, p + c : p + c + r] = REJECTED
        base = row * width
        # token k of the chosen completion is predicted by the state before it: the prompt's last token, then chosen k-1
        src_c.extend([base + p - 1, *range(base + p, base + p + c - 1)])
        tgt_c.extend(pair.chosen_ids)
        seq_c.extend([row] * c)
        src_r.extend([base + p - 1, *range(base + p + c, base + p + c + r - 1)])
        tgt_r.extend(pair.rejected_ids)
        seq_r.extend([b + row] * r)
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        segments=segments,
        source_index=torch.tensor(src_c + src_r, dtype=torch.long),
        target_ids=torch.tensor(tgt_c + tgt_r, dtype=torch.long),
        sequence_index=torch.tensor(seq_c + seq_r, dtype=torch.long),
        chosen_lengths=torch.tensor([len(p.chosen_ids) for p in pairs], dtype=torch.long),
        rejected_lengths=torch.tensor([len(p.rejected_ids) for p in pairs], dtype=torch.long),
        example_index=torch.tensor(list(indices), dtype=torch.long),
    )

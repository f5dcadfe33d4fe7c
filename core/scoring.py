"""Completion log-probs of chosen and rejected answers in one forward, without a full-vocabulary tensor.

The decoder runs once over packed ``[prompt; chosen; rejected]`` rows (core.packing); the LM head and
the cross-entropy then run only on the hidden states that predict completion tokens, and only a chunk
of those positions at a time: each chunk's ``[chunk, vocab]`` logits are made, reduced to fp32
log-probs (and each row's mean logit, TRL's ``logits/*`` metric, from the same logits) and dropped, and rebuilt in
backward (non-reentrant activation checkpointing per chunk). Peak memory then grows with
``chunk_size × vocab``, not ``completion tokens × vocab``; gradients are the same as with one chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from core.attention import FLEX_BUCKET, prepare_attention, uses_flex
from core.models import causal_lm
from core.packing import PackedBatch, RowLayout
from core.precision import autocast, compute_dtype

if TYPE_CHECKING:  # core.spec needs pydantic; the scorer must import without it (bench/gpu_check.py)
    from core.spec import TrainingSpec

LOGPS_CHUNK_SIZE = 1024
"""Completion positions per LM-head chunk by default (TrainingSpec.logps_chunk_size)."""

HEAD_UNIT_METHOD = "completion_logps"
"""What core.sharding names the method it gives a sharded LM head, called instead of the chunked pass
below: a head sharded by vocabulary rows runs its own (core.vocab_sharding); a head that is an FSDP unit
of its own runs the pass below as one FSDP forward (one gather, one reduce-scatter when its backward ends)."""


@dataclass
class PairScores:
    """Summed completion log-probs and mean completion logits per pair, shape ``[B]`` each."""

    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_logits_mean: Tensor
    rejected_logits_mean: Tensor


class PairScorer(nn.Module):
    """Wraps a causal LM (optionally peft) so that DDP sees one module whose forward scores a PackedBatch.

    ``compute_dtype`` bfloat16 runs the decoder and the head under autocast (core.precision); the
    log-softmax, the sums and everything after them are fp32 either way. ``layout`` is how callers
    pack this scorer's batches (``scorer.layout.pack(...)``); any layout gives the same scores, in
    batch order.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        chunk_size: int = LOGPS_CHUNK_SIZE,
        compute_dtype: torch.dtype = torch.float32,
        layout: RowLayout | None = None,
    ) -> None:
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        self.model = model
        self.chunk_size = chunk_size
        self.compute_dtype = compute_dtype
        self.param_dtype: torch.dtype | None = None  # FSDP's mixed-precision cast, when it has one
        self.layout = layout or RowLayout()

    def forward(self, batch: PackedBatch) -> PairScores:
        lm = causal_lm(self.model)
        decoder = lm.get_decoder()
        head = lm.get_output_embeddings()
        device = batch.input_ids.device
        dtype = self.param_dtype or next(decoder.parameters()).dtype  # what the attention computes in
        batch, attention_mask = prepare_attention(batch, lm, dtype)  # dense mask, or BlockMask for flex
        with autocast(self.compute_dtype, device):
            out = decoder(
                input_ids=batch.input_ids,
                attention_mask=attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.source_index)
        own_unit = getattr(head, HEAD_UNIT_METHOD, None)
        if own_unit is not None:
            token_logps, logit_means = own_unit(selected, batch.target_ids)
        else:
            token_logps, logit_means = self.head_logps(head, selected, batch.target_ids)
        b = batch.num_pairs
        seq_logps = torch.zeros(2 * b, dtype=token_logps.dtype, device=device)
        seq_logps = seq_logps.index_add(0, batch.sequence_index, token_logps)
        with torch.no_grad():
            counts = torch.cat([batch.chosen_lengths, batch.rejected_lengths]).to(logit_means.dtype)
            per_sequence = torch.zeros(2 * b, dtype=logit_means.dtype, device=device)
            seq_means = per_sequence.index_add(0, batch.sequence_index, logit_means) / counts
        return PairScores(seq_logps[:b], seq_logps[b:], seq_means[:b], seq_means[b:])

    def head_logps(
        self, head: Callable[[Tensor], Tensor], hidden: Tensor, targets: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``completion_logps`` of ``hidden`` through ``head`` in this scorer's chunks and compute precision."""

        def head_logits(states: Tensor) -> Tensor:
            with autocast(self.compute_dtype, states.device):
                return head(states)

        return completion_logps(
            hidden, targets, head_logits, chunk_size=self.chunk_size, softcap=self.softcap
        )

    @property
    def softcap(self) -> float | None:
        """The model's final-logit soft cap (Gemma 2), or None."""
        return getattr(causal_lm(self.model).config, "final_logit_softcapping", None)


def scorer_for(model: nn.Module, training: TrainingSpec, device: torch.device | str) -> PairScorer:
    """The PairScorer a job's training settings ask for (chunk size, compute precision on ``device``, row layout)."""
    return PairScorer(
        model,
        chunk_size=training.logps_chunk_size,
        compute_dtype=compute_dtype(training.precision, device),
        layout=row_layout(training, flex=uses_flex(causal_lm(model))),
    )


def row_layout(training: TrainingSpec, *, flex: bool = False) -> RowLayout:
    """``training.pairs_per_row`` (``auto``: as many as fit) within ``training.max_length`` tokens a row.

    ``flex``: the model pads rows to FLEX_BUCKET tokens, which the row planner takes into account.
    """
    per_row = training.pairs_per_row
    multiple = FLEX_BUCKET if flex else 1
    return RowLayout(None if per_row == "auto" else per_row, training.max_length, multiple)


def completion_logps(
    hidden: Tensor,
    targets: Tensor,
    head: Callable[[Tensor], Tensor],
    *,
    chunk_size: int = LOGPS_CHUNK_SIZE,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """fp32 ``log p(target)`` per position (``[N]``, differentiable) and the detached mean of its logits.

    ``hidden`` is ``[N, d]``; ``head`` maps it to ``[N, vocab]`` logits. Positions go through the head
    ``chunk_size`` at a time; when gradients are recorded each chunk is checkpointed (non-reentrant),
    so its logits are recomputed in backward instead of kept.
    """
    n = hidden.shape[0]
    if n <= chunk_size:
        return _chunk_logps(head, softcap, hidden, targets)
    record = torch.is_grad_enabled()
    parts = []
    for start in range(0, n, chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if record:
            parts.append(checkpoint(_chunk_logps, head, softcap, h, t, use_reentrant=False))
        else:
            parts.append(_chunk_logps(head, softcap, h, t))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _chunk_logps(
    head: Callable[[Tensor], Tensor], softcap: float | None, hidden: Tensor, targets: Tensor
) -> tuple[Tensor, Tensor]:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    token_logps = -F.cross_entropy(logits, targets, reduction="none")
    return token_logps, logits.detach().mean(-1)

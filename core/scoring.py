"""Completion log-probs of chosen and rejected answers in one forward, without a full-vocabulary log_softmax.

The decoder runs once over packed ``[prompt; chosen; rejected]`` rows (core.packing); the LM head and
the cross-entropy then run only on the hidden states that predict completion tokens, so the
``[tokens, vocab]`` logits exist for completion positions alone (HH-RLHF prompts are most of each
pair and GPT-2's vocabulary has 50,257 entries).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.models import causal_lm
from core.packing import PackedBatch


@dataclass
class PairScores:
    """Summed completion log-probs and mean completion logits per pair, shape ``[B]`` each."""

    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_logits_mean: Tensor
    rejected_logits_mean: Tensor


class PairScorer(nn.Module):
    """Wraps a causal LM (optionally peft) so that DDP sees one module whose forward scores a PackedBatch."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: PackedBatch) -> PairScores:
        lm = causal_lm(self.model)
        decoder = lm.get_decoder()
        head = lm.get_output_embeddings()
        dtype = next(decoder.parameters()).dtype
        out = decoder(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask(dtype),
            position_ids=batch.position_ids,
            use_cache=False,
        )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.source_index)
        logits = head(selected).float()
        softcap = getattr(lm.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        token_logps = -F.cross_entropy(logits, batch.target_ids, reduction="none")
        b = batch.num_pairs
        seq_logps = torch.zeros(2 * b, dtype=token_logps.dtype, device=token_logps.device)
        seq_logps = seq_logps.index_add(0, batch.sequence_index, token_logps)
        with torch.no_grad():
            counts = torch.cat([batch.chosen_lengths, batch.rejected_lengths]).to(logits.dtype)
            logit_sums = torch.zeros(2 * b, dtype=logits.dtype, device=logits.device)
            position_means = _mean_logit(head, selected, logits, softcap)
            logit_means = logit_sums.index_add(0, batch.sequence_index, position_means) / counts
        return PairScores(seq_logps[:b], seq_logps[b:], logit_means[:b], logit_means[b:])


def _mean_logit(head: nn.Module, hidden: Tensor, logits: Tensor, softcap: float | None) -> Tensor:
    """Mean over the vocabulary of each position's logits (TRL's ``logits/*`` metric).

    For a plain linear head the mean of ``h·Wᵀ + b`` over the vocabulary is ``h·mean(W) + mean(b)``,
    an ``O(d)`` dot product per position instead of another pass over ``[N, vocab]``.
    """
    weight = getattr(head, "weight", None)
    if softcap or not isinstance(head, nn.Linear) or weight is None:
        return logits.mean(-1)
    mean = hidden.detach().float() @ weight.detach().float().mean(0)
    return mean + head.bias.detach().float().mean() if head.bias is not None else mean

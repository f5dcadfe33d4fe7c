"""SFT jobs (`loss: {type: sft}` alone), in the training worker: `[prompt; chosen]` rows, token-mean NLL.

An SFT job trains on the chosen answers only. Its rows hold the prompt and the chosen completion
(the rejected one is never packed nor scored) with the same attention and position layout as
core.packing, so the PairScorer scores them unchanged; there is no reference model. The loss of a
micro-batch is the negative log-likelihood of its chosen tokens divided by their number (a
token-weighted mean over the micro-batch); the reported ``loss``/``nll`` are token-weighted over
the whole step or the whole eval split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from core.data.batching import plan_rows
from core.losses import MetricSums
from core.packing import CHOSEN, PAD, PROMPT, PackedBatch, PairTokens, RowLayout
from core.pair_loss import BatchLoss
from core.reference_source import ReferenceSource

SFT_METRIC_NAMES: tuple[str, ...] = ("loss", "nll", "logps/chosen")
"""What an SFT job reports per step (``eval/``-prefixed at evaluation)."""


def chosen_width(pair: PairTokens) -> int:
    """Tokens a pair takes in an SFT row: prompt and chosen."""
    return len(pair.prompt_ids) + len(pair.chosen_ids)


def pack_chosen(
    pairs: Sequence[PairTokens], indices: Sequence[int], pad_id: int, layout: RowLayout
) -> PackedBatch:
    """`[prompt; chosen]` rows planned like ``layout`` plans pair rows; ``rejected_lengths`` are all 0."""
    b = len(pairs)
    if len(indices) != b:
        raise ValueError(f"{b} pairs but {len(indices)} example indices")
    widths = [chosen_width(p) for p in pairs]
    rows = plan_rows(widths, layout.max_length, layout.pairs_per_row, multiple=layout.row_multiple)
    width = max(sum(widths[i] for i in r) for r in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segments = torch.full(shape, PAD, dtype=torch.long)
    documents = torch.full(shape, -1, dtype=torch.long)
    flat_ids, flat_pos, flat_seg, flat_doc = (
        x.view(-1) for x in (input_ids, position_ids, segments, documents)
    )
    starts = [0] * b  # flat offset of each pair's first chosen token
    for row, members in enumerate(rows):
        at = row * width
        for doc, i in enumerate(members):
            p, c = len(pairs[i].prompt_ids), len(pairs[i].chosen_ids)
            if p == 0 or c == 0:
                raise ValueError("an SFT row needs a non-empty prompt and chosen completion")
            flat_ids[at : at + p + c] = torch.tensor([*pairs[i].prompt_ids, *pairs[i].chosen_ids])
            flat_pos[at : at + p + c] = torch.arange(p + c)
            flat_seg[at : at + p] = PROMPT
            flat_seg[at + p : at + p + c] = CHOSEN
            flat_doc[at : at + p + c] = doc
            starts[i] = at + p
            at += p + c
        position_ids[row, at - row * width :] = torch.arange(width - (at - row * width))
    # token k of a chosen answer is predicted by the state before it: the prompt's last token, then token k-1
    source = [k for i, p in enumerate(pairs) for k in range(starts[i] - 1, starts[i] + len(p.chosen_ids) - 1)]
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        segments=segments,
        documents=documents,
        source_index=torch.tensor(source, dtype=torch.long),
        target_ids=torch.tensor([t for p in pairs for t in p.chosen_ids], dtype=torch.long),
        sequence_index=torch.tensor([i for i, p in enumerate(pairs) for _ in p.chosen_ids], dtype=torch.long),
        chosen_lengths=torch.tensor([len(p.chosen_ids) for p in pairs], dtype=torch.long),
        rejected_lengths=torch.zeros(b, dtype=torch.long),
        example_index=torch.tensor(list(indices), dtype=torch.long),
    )


class SftSums(MetricSums):
    """Per-pair chosen NLL, token counts and log-probs, reduced to a token-weighted NLL (one all-reduce)."""

    def __init__(self) -> None:
        super().__init__(("chosen_nll", "chosen_tokens", "logps/chosen"))

    def reduce(self, all_reduce_sum: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        means = super().reduce(all_reduce_sum)
        if not means:
            return {}
        nll = means["chosen_nll"] / means["chosen_tokens"]  # Σ NLL / Σ tokens: the pair counts cancel
        return {"loss": nll, "nll": nll, "logps/chosen": means["logps/chosen"]}


class SftLoss(BatchLoss):
    """Token-mean negative log-likelihood of the chosen answers; no reference, nothing about rejected."""

    needs_reference = False

    def pack(
        self, layout: RowLayout, pairs: Sequence[PairTokens], indices: Sequence[int], pad_id: int
    ) -> PackedBatch:
        return pack_chosen(pairs, indices, pad_id, layout)

    def new_sums(self) -> MetricSums:
        return SftSums()

    def __call__(
        self, scorer: nn.Module, batch: PackedBatch, reference: ReferenceSource, offset: int = 0
    ) -> tuple[Tensor, Mapping[str, Tensor]]:
        """The micro-batch's ``Σ −log p(chosen token) / Σ chosen tokens`` and its per-pair sums."""
        pc = scorer(batch).chosen_logps  # the scorer's rejected outputs are empty here and unused
        lengths = batch.chosen_lengths.to(pc.dtype)
        loss = -pc.sum() / lengths.sum()
        detached = pc.detach()
        return loss, {"chosen_nll": -detached, "chosen_tokens": lengths, "logps/chosen": detached}

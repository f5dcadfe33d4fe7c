"""One packed batch to its loss and metrics, and the held-out evaluation reduced over ranks.

`BatchLoss` is what the training loop steps with: how a batch of pairs is packed, its loss, and how
its metrics are summed. `PairLoss` is the DPO family's (core.losses); core.sft has the SFT job's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from core.data import EncodedPair
from core.data.batching import LengthGroupedBatches
from core.losses import MetricSums, WeightedLoss, pair_metrics
from core.packing import PackedBatch, PairTokens, RowLayout
from core.reference_source import ReferenceSource
from core.scoring import PairScorer
from core.sharding import reshard_after_no_grad
from core.spec import LossSpec


class BatchLoss(ABC):
    """A job's loss over packed batches: ``pack``, ``__call__`` (loss and metric values), ``new_sums``."""

    needs_reference: bool = True

    def pack(
        self, layout: RowLayout, pairs: Sequence[PairTokens], indices: Sequence[int], pad_id: int
    ) -> PackedBatch:
        """One batch of pairs as the scorer's rows."""
        return layout.pack(pairs, indices, pad_id)

    def new_sums(self) -> MetricSums:
        """An empty accumulator for this loss's metric values (one step, or one evaluation)."""
        return MetricSums()

    @abstractmethod
    def __call__(
        self, scorer: nn.Module, batch: PackedBatch, reference: ReferenceSource, offset: int = 0
    ) -> tuple[Tensor, Mapping[str, Tensor]]:
        """The micro-batch's scalar loss and the per-pair values ``new_sums`` accumulates."""

    def evaluate(
        self,
        scorer: PairScorer,
        pairs: Sequence[EncodedPair],
        plan: LengthGroupedBatches,
        reference: ReferenceSource,
        *,
        offset: int,
        pad_id: int,
        device: torch.device,
        all_reduce_sum: Callable[[Tensor], Tensor] | None,
    ) -> dict[str, float]:
        """Held-out metrics (``eval/`` prefix) over this rank's batches of ``plan``, reduced over ranks.

        Every rank of a plan gets the same number of batches, so a sharded scorer's collectives match.
        """
        sums = self.new_sums()
        scorer.eval()
        with torch.no_grad():
            for idx in plan.epoch(0):
                batch = self.pack(scorer.layout, [pairs[i] for i in idx], idx, pad_id).to(device)
                sums.add(self(scorer, batch, reference, offset)[1])
        scorer.train()
        reshard_after_no_grad(scorer)
        return {f"eval/{k}": v for k, v in sums.reduce(all_reduce_sum).items()}


class PairLoss(BatchLoss):
    """The job's weighted loss over a scorer's log-probs and the reference's, with its metrics."""

    def __init__(self, loss: LossSpec) -> None:
        self.beta = loss.beta
        self.loss_fn = WeightedLoss(loss.names, loss.weight_values, loss.beta, loss.extra())
        self.needs_reference = self.loss_fn.needs_reference

    def __call__(
        self, scorer: nn.Module, batch: PackedBatch, reference: ReferenceSource, offset: int = 0
    ) -> tuple[Tensor, Mapping[str, Tensor]]:
        """Mean per-pair loss of one packed batch and its per-pair metrics (``offset``: see ReferenceSource)."""
        scores = scorer(batch)
        rc, rr = reference.logps(batch, offset=offset)
        per_pair = self.loss_fn(
            scores.chosen_logps,
            scores.rejected_logps,
            rc,
            rr,
            chosen_lengths=batch.chosen_lengths,
            rejected_lengths=batch.rejected_lengths,
        )
        metrics = pair_metrics(
            per_pair,
            scores.chosen_logps,
            scores.rejected_logps,
            rc,
            rr,
            beta=self.beta,
            chosen_logits_mean=scores.chosen_logits_mean,
            rejected_logits_mean=scores.rejected_logits_mean,
        )
        return per_pair.mean(), metrics

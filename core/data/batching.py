"""Deterministic length-grouped batch plans, per epoch and per rank (HF LengthGroupedSampler style)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

MEGABATCH_MULT = 50


class LengthGroupedBatches:
    """Which dataset indices form each batch of one rank, epoch by epoch; a pure function of its inputs.

    With ``shuffle``: indices are permuted (torch.Generator seeded with seed + epoch), cut into
    megabatches of world_size * batch_size * 50, each sorted by length (longest first) and cut into
    global steps of world_size * batch_size; the step order is then permuted so the longest steps
    are not all first. Step k gives rank r the slice [r * batch_size, (r + 1) * batch_size), which is
    the same as dealing batch_size-batches round-robin (rank r gets batches r, r + W, ...) while
    keeping the batches of one step close in length, so no rank waits long for another.
    Without ``shuffle`` (evaluation) the order is sequential.

    world_size 1: every index exactly once per epoch; only the last batch may be smaller.
    world_size > 1: every rank gets the same number of batches of the same sizes; the final short
    step is split evenly and the (at most world_size - 1) indices left over are dropped.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.lengths = [int(n) for n in lengths]
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle

    def num_batches(self) -> int:
        """Batches this rank gets per epoch (the same on every rank and in every epoch)."""
        step = self.batch_size * self.world_size
        full, rest = divmod(len(self.lengths), step)
        return full + (1 if rest >= self.world_size else 0)

    def __len__(self) -> int:
        return self.num_batches()

    def _steps(self, epoch: int) -> list[list[int]]:
        n, step = len(self.lengths), self.batch_size * self.world_size
        if not self.shuffle:
            return [list(range(i, min(i + step, n))) for i in range(0, n, step)]
        gen = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(n, generator=gen).tolist()
        mega = step * MEGABATCH_MULT
        steps: list[list[int]] = []
        for start in range(0, n, mega):
            group = sorted(order[start : start + mega], key=lambda i: -self.lengths[i])
            steps.extend(group[i : i + step] for i in range(0, len(group), step))
        shuffled = torch.randperm(len(steps), generator=gen).tolist()
        return [steps[i] for i in shuffled]

    def epoch(self, epoch: int) -> list[list[int]]:
        """This rank's batches for ``epoch``: lists of indices into the dataset."""
        bs, world = self.batch_size, self.world_size
        batches: list[list[int]] = []
        for indices in self._steps(epoch):
            if len(indices) == bs * world:
                batches.append(indices[self.rank * bs : (self.rank + 1) * bs])
                continue
            share = len(indices) // world  # the one short step: split evenly, drop the remainder
            if share:
                batches.append(indices[self.rank * share : (self.rank + 1) * share])
        return batches

"""Deterministic batch plans: length-grouped batches per epoch and rank, and which pairs of a batch share a row."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

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

    def stream(self, epoch: int = 0, batch: int = 0) -> Iterator[tuple[int, int, list[int]]]:
        """Batches from position (epoch, batch) on, epoch after epoch: (epoch, index in epoch, indices)."""
        while True:
            batches = self.epoch(epoch)
            for i in range(batch, len(batches)):
                yield epoch, i, batches[i]
            epoch, batch = epoch + 1, 0


CAP_STEPS = 16
"""plan_rows tries this many row caps (plus one) between the widest pair and max_length."""


def plan_rows(
    widths: Sequence[int], max_length: int | None, pairs_per_row: int | None = 1, *, multiple: int = 1
) -> list[list[int]]:
    """Which pairs of one batch share a packed row: lists of positions into ``widths``, each row ascending.

    ``widths[i]`` is pair i's packed width (prompt + chosen + rejected tokens). Rows hold at most
    ``pairs_per_row`` pairs (None: no limit) and, when they hold more than one, at most ``max_length``
    tokens (None: unbounded); a pair wider than ``max_length`` has a row to itself. Rows are filled
    first fit, widest pair first, up to a row cap; of the caps from the widest pair to
    ``max_length``, the one with the fewest slots computed (rows × the widest row rounded up to
    ``multiple``, the FlexAttention bucket) wins, the shorter cap on a tie. The widest pair's own
    width is a candidate, so a batch is never padded more than with one pair per row.
    ``pairs_per_row`` 1 is one row per pair, in batch order.
    """
    if pairs_per_row is not None and pairs_per_row < 1:
        raise ValueError(f"pairs_per_row must be >= 1, got {pairs_per_row}")
    if pairs_per_row == 1 or len(widths) < 2:
        return [[i] for i in range(len(widths))]
    widest, limit = max(widths), sum(widths) if max_length is None else max_length
    most = len(widths) if pairs_per_row is None else pairs_per_row
    caps = (
        {limit}
        if widest >= limit
        else {widest + (limit - widest) * k // CAP_STEPS for k in range(CAP_STEPS + 1)}
    )
    plans = [_first_fit(widths, cap, most) for cap in sorted(caps)]
    best = min(
        plans, key=lambda rows: len(rows) * _round_up(max(sum(widths[i] for i in r) for r in rows), multiple)
    )
    return [sorted(row) for row in best]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _first_fit(widths: Sequence[int], cap: int, most: int) -> list[list[int]]:
    """First fit, widest first: each pair joins the first row with room under ``cap`` and fewer than ``most`` pairs."""
    rows: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(widths)), key=lambda k: (-widths[k], k)):
        row = next((r for r in range(len(rows)) if used[r] + widths[i] <= cap and len(rows[r]) < most), None)
        if row is None:
            rows.append([i])
            used.append(widths[i])
        else:
            rows[row].append(i)
            used[row] += widths[i]
    return rows

"""LengthGroupedBatches: deterministic, complete, length-grouped, and fair across ranks."""

from __future__ import annotations

import random

import pytest

from core.data import LengthGroupedBatches


def _lengths(n: int, seed: int = 7) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(5, 600) for _ in range(n)]


def _padding(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_single_rank_covers_every_index_once_per_epoch() -> None:
    lengths = _lengths(1003)
    plan = LengthGroupedBatches(lengths, 8, seed=3)
    assert plan.num_batches() == len(plan) == 126  # ceil(1003 / 8)
    for epoch in range(3):
        batches = plan.epoch(epoch)
        assert len(batches) == plan.num_batches()
        assert sorted(i for b in batches for i in b) == list(range(1003))
        assert sorted(len(b) for b in batches)[1:] == [8] * 125  # only one batch may be smaller
        assert min(len(b) for b in batches) == 1003 % 8


def test_deterministic_and_epoch_dependent() -> None:
    lengths = _lengths(500)
    a, b = LengthGroupedBatches(lengths, 4, seed=11), LengthGroupedBatches(lengths, 4, seed=11)
    assert a.epoch(2) == b.epoch(2)
    assert a.epoch(0) != a.epoch(1)
    assert a.epoch(0) != LengthGroupedBatches(lengths, 4, seed=12).epoch(0)


def test_batches_are_grouped_by_length() -> None:
    lengths = _lengths(2000)
    plan = LengthGroupedBatches(lengths, 8, seed=0)
    batches = plan.epoch(0)
    rng = random.Random(0)
    order = list(range(2000))
    rng.shuffle(order)
    random_batches = [order[i : i + 8] for i in range(0, 2000, 8)]
    assert _padding(batches, lengths) * 5 < _padding(random_batches, lengths)
    # the batch order is shuffled: the longest batches are not all first
    maxima = [max(lengths[i] for i in b) for b in batches]
    assert maxima != sorted(maxima, reverse=True)


def test_sequential_order_without_shuffle() -> None:
    plan = LengthGroupedBatches(_lengths(10), 4, seed=0, shuffle=False)
    assert plan.epoch(0) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert plan.epoch(5) == plan.epoch(0)


@pytest.mark.parametrize(("n", "batch_size"), [(1003, 8), (64, 8), (17, 4), (3, 4)])
def test_two_ranks_equal_batch_counts_and_disjoint(n: int, batch_size: int) -> None:
    lengths = _lengths(n)
    ranks = [LengthGroupedBatches(lengths, batch_size, 5, rank=r, world_size=2) for r in range(2)]
    for epoch in (0, 1):
        plans = [r.epoch(epoch) for r in ranks]
        assert len(plans[0]) == len(plans[1]) == ranks[0].num_batches() == ranks[1].num_batches()
        assert [len(b) for b in plans[0]] == [len(b) for b in plans[1]]  # same step sizes: no rank waits
        seen = [set(i for b in p for i in b) for p in plans]
        assert not seen[0] & seen[1]
        covered = seen[0] | seen[1]
        assert len(covered) == sum(len(b) for p in plans for b in p)
        assert n - len(covered) <= 1  # at most world_size - 1 indices dropped


def test_two_ranks_share_each_step_of_one_sorted_run() -> None:
    lengths = _lengths(96)
    r0, r1 = (LengthGroupedBatches(lengths, 8, 9, rank=r, world_size=2).epoch(0) for r in range(2))
    # rank r's k-th batch is slice r of global step k, cut from a run sorted longest first
    for b0, b1 in zip(r0, r1, strict=True):
        assert min(lengths[i] for i in b0) >= max(lengths[i] for i in b1)
    # together the ranks run exactly the one-rank plan with the global batch size
    assert LengthGroupedBatches(lengths, 16, 9).epoch(0) == [b0 + b1 for b0, b1 in zip(r0, r1, strict=True)]


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        LengthGroupedBatches([1, 2], 0, 0)
    with pytest.raises(ValueError):
        LengthGroupedBatches([1, 2], 2, 0, rank=2, world_size=2)
    assert LengthGroupedBatches([], 4, 0).epoch(0) == []

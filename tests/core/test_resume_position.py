"""check_resume_position: which (world size, batch size) may continue a checkpoint's place in the data."""

from __future__ import annotations

import pytest

from core.checkpointing import LoopState, check_resume_position
from core.data import LengthGroupedBatches
from core.run_context import TrainingError


def test_same_pairs_per_step_resume_the_same_global_steps() -> None:
    """What the check relies on: 2 ranks of 2 and 1 rank of 4 cut an epoch into the same steps."""
    lengths = [(7 * i) % 31 + 1 for i in range(48)]
    one = LengthGroupedBatches(lengths, 4, seed=3).epoch(1)
    two = [LengthGroupedBatches(lengths, 2, seed=3, rank=r, world_size=2).epoch(1) for r in range(2)]
    assert one == [a + b for a, b in zip(*two, strict=True)]
    check_resume_position(LoopState(step=5, world_size=2, batch_size=2), 1, 4)
    check_resume_position(LoopState(step=5, world_size=1, batch_size=4), 4, 1)


def test_other_pairs_per_step_are_refused_and_old_checkpoints_are_not_checked() -> None:
    with pytest.raises(TrainingError) as raised:
        check_resume_position(LoopState(step=5, world_size=2, batch_size=2), 2, 4)
    assert raised.value.code == "resume_batch_mismatch"
    assert "num_workers 2 and training.batch_size 2" in raised.value.message
    assert "num_workers 2 and batch_size 4 (8)" in raised.value.message
    check_resume_position(LoopState(step=5), 2, 4)  # written before checkpoints recorded their layout

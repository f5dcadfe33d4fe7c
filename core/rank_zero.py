"""Decisions made once, on rank 0, and shared with every rank of a job (small pickled objects)."""

from __future__ import annotations

from typing import TypeVar

import torch.distributed as torch_dist

T = TypeVar("T")


def share_from_rank0(value: T, world_size: int) -> T:
    """Rank 0's ``value`` on every rank (``broadcast_object_list``); ``value`` itself for one process.

    Every rank must call it at the same point; what the other ranks pass is ignored.
    """
    if world_size <= 1 or not torch_dist.is_initialized():
        return value
    box = [value]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]

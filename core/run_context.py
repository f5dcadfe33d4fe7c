"""What the outside world hands a training run (parallelism, options) and what the run hands back
(a result, or a TrainingError)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from core.data import ValidationReport
from core.data.limits import DEFAULT_LIMITS, DataLimits
from core.failures import JobFailure


class TrainingError(JobFailure):
    """A run that cannot go on, and would not on a retry; `code` is machine-readable, `message` for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)


@dataclass
class Distributed:
    """What the outside world tells the loop about parallelism (defaults: one process).

    ``wrap_model`` wraps the scorer for data parallelism (DDP from Ray's ``prepare_model``); under
    ``resources.strategy: fsdp`` the loop shards the model itself (core.sharding) and ignores it.
    """

    rank: int = 0
    world_size: int = 1
    all_reduce_sum: Callable[[Tensor], Tensor] | None = None
    wrap_model: Callable[[nn.Module], nn.Module] | None = None


@dataclass
class RunOptions:
    """Where the run writes and how it is controlled."""

    output_dir: Path
    cache_dir: Path | None = None
    device: torch.device | str = "cpu"
    resume_from: Path | Literal["latest"] | None = None
    allow_remote_code: bool = False
    should_stop: Callable[[], bool] | None = None
    data_limits: DataLimits = DEFAULT_LIMITS


@dataclass
class TrainResult:
    """What a finished (or cancelled) run leaves behind."""

    status: Literal["completed", "cancelled"]
    step: int
    total_steps: int
    metrics: dict[str, float]
    eval_metrics: dict[str, float]
    final_model_dir: Path | None
    report: ValidationReport
    extra: dict[str, Any] = field(default_factory=dict)

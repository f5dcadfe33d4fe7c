"""How one job's Ray run ended: a typed value handed from rank 0 to the fit task to the driver (no Ray, no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from core.failures import JobFailure

RunStatus = Literal["succeeded", "failed", "cancelled"]


@dataclass(frozen=True)
class RunOutcome:
    """succeeded (with its final model), cancelled (at a checkpointed step) or failed (with its JobFailure).

    `failure` is set exactly when the run failed. `last_step` is the last optimizer step the run took;
    the driver fills `latest_checkpoint` from what it forwarded.
    """

    status: RunStatus
    last_step: int = 0
    total_steps: int | None = None
    final_model_dir: Path | None = None
    failure: JobFailure | None = None
    latest_checkpoint: str | None = None

    def __post_init__(self) -> None:
        if (self.status == "failed") != (self.failure is not None):
            raise ValueError(
                f"a {self.status} run {'needs' if self.status == 'failed' else 'has no'} failure"
            )

    @classmethod
    def failed(cls, failure: JobFailure, *, last_step: int = 0, total_steps: int | None = None) -> RunOutcome:
        return cls("failed", last_step, total_steps, failure=failure)

"""A job's launch record: validated once in the driver, passed as one object to the fit task and Train workers.

No torch and no Ray (the driver imports it). Ray pickles the record into the fit task and Ray Train's
`train_loop_config`; unpickling a pydantic model does not validate it again, and every process that
receives it has `core.spec` imported already (the warm pool's, workers/preload.py, included).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from core.data.limits import DataLimits
from core.settings import Settings
from core.spec import JobSpec
from workers.conventions import job_output_dir, shared_cache_dir


@dataclass(frozen=True)
class LaunchRecord:
    """A job as its run sees it: the validated spec, where its files go, and the operator's policy for it."""

    job_id: str
    spec: JobSpec
    artifacts_dir: Path
    allow_remote_code: bool = False
    data_limits: DataLimits = field(default_factory=DataLimits)

    @classmethod
    def from_settings(cls, job_id: str, spec: JobSpec, settings: Settings) -> LaunchRecord:
        """The record the driver builds once it has validated the job's spec."""
        return cls(
            job_id,
            spec,
            settings.artifacts_dir,
            allow_remote_code=settings.allow_remote_code,
            data_limits=settings.data_limits(),
        )

    @property
    def output_dir(self) -> Path:
        """Where the loop writes the job's checkpoints and final model."""
        return job_output_dir(self.artifacts_dir, self.job_id)

    @property
    def cache_dir(self) -> Path:
        """The reference log-prob and hub dataset caches, shared by every job."""
        return shared_cache_dir(self.artifacts_dir)

    @property
    def storage_path(self) -> Path:
        """Ray Train's storage for the run (its checkpoints' index); the same job_id resumes the same run."""
        return (self.artifacts_dir / "ray").resolve()

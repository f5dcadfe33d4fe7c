"""Response models of the HTTP API, shared by the server and minordpo_client (request bodies are core.spec.JobSpec)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field

from core.data.report import ValidationReport


class Progress(BaseModel):
    """Optimizer steps done and planned (total_steps is known once the run has started)."""

    step: int = 0
    total_steps: int | None = None


class JobError(BaseModel):
    """Why a job failed, in words a person can act on."""

    code: str
    message: str


class JobOut(BaseModel):
    """A job as the API shows it."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "job_01jd3m5k8q9t0v1w2x3y4z5a6b",
                    "name": "hh-minordpo",
                    "project": "team-a",
                    "status": "running",
                    "cancel_requested": False,
                    "spec": {"name": "hh-minordpo", "model": {"path": "/srv/models/tiny-llama"}},
                    "created_at": "2026-01-01T12:00:00Z",
                    "started_at": "2026-01-01T12:00:05Z",
                    "finished_at": None,
                    "progress": {"step": 40, "total_steps": 120},
                    "metrics": {"loss": 0.61, "rewards/accuracies": 0.7},
                    "error": None,
                    "queue_position": None,
                }
            ]
        }
    )

    id: str
    name: str
    project: str
    status: str = Field(description="queued | running | succeeded | failed | cancelled")
    cancel_requested: bool = False
    spec: dict[str, Any] = Field(
        description="The job spec as accepted (local paths resolved, dataset ids to files)"
    )
    created_at: datetime
    updated_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: Progress
    metrics: dict[str, Any] | None = Field(None, description="The latest reported metrics")
    error: JobError | None = None
    queue_position: int | None = Field(None, description="1 = next to start; only while queued")
    queue_reason: str | None = Field(
        None,
        description="Why a queued job waits: `project_quota: ...` (its project's MINORDPO_PROJECT_QUOTAS) "
        "or `capacity: ...` (the cluster's free CPUs/GPUs, MINORDPO_MAX_CONCURRENT_JOBS); only while queued",
    )
    attempt: int = 0
    group: str | None = Field(None, description="The job's group (spec.group), e.g. a sweep")

    @computed_field(description="The job this one starts from (spec.model.from_job), if any")  # type: ignore[prop-decorator]
    @property
    def source_job(self) -> str | None:
        source = (self.spec.get("model") or {}).get("from_job")
        return source if isinstance(source, str) else None

    @computed_field(description="The source job's checkpoint step (null: its final model)")  # type: ignore[prop-decorator]
    @property
    def source_step(self) -> int | None:
        step = (self.spec.get("model") or {}).get("step")
        return step if isinstance(step, int) and self.source_job else None


class JobPage(BaseModel):
    """One page of jobs, newest first; pass next_cursor as `after` for the next page."""

    data: list[JobOut]
    next_cursor: str | None = None


class MetricSeries(BaseModel):
    """Metric rows `{step, time, <name>: value}`; pass next_after_step as `after_step` to continue."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "data": [
                        {"step": 1, "time": 1767268805.1, "loss": 0.69},
                        {"step": 2, "time": 1767268806.3, "loss": 0.66},
                    ],
                    "next_after_step": 2,
                }
            ]
        }
    )

    data: list[dict[str, Any]]
    next_after_step: int | None = None


class EventOut(BaseModel):
    """A stored job event (status move, checkpoint, retry, webhook delivery, ...)."""

    seq: int
    kind: str
    message: str
    data: dict[str, Any] | None = None
    time: datetime


class EventPage(BaseModel):
    """Events after a seq, oldest first; pass next_after as `after` for more (null = none stored yet)."""

    data: list[EventOut]
    next_after: int | None = None


class CheckpointOut(BaseModel):
    """A saved checkpoint (the final model is a Hugging Face folder)."""

    step: int
    path: str
    created_at: datetime
    metrics: dict[str, Any] | None = None


class DerivedJob(BaseModel):
    """A job that starts from another job's final model (source_step null) or one of its checkpoints."""

    id: str
    name: str
    status: str
    source_step: int | None = None


class DerivedJobList(BaseModel):
    """Jobs chained from one job, oldest first."""

    data: list[DerivedJob]


class CheckpointList(BaseModel):
    """Checkpoints of a job, by step."""

    data: list[CheckpointOut]


class GenerationSample(BaseModel):
    """One eval prompt, its chosen answer and the model's greedy completion at that step."""

    index: int
    prompt: str
    chosen: str
    completion: str


class JobGenerations(BaseModel):
    """Eval generations of a job at one step (the latest unless asked), and every step that has them."""

    steps: list[int] = Field(description="Eval steps with generations, ascending")
    step: int | None = Field(description="The step of `data`; null while the job has none")
    data: list[GenerationSample]


class RowProblem(BaseModel):
    """A line of an uploaded file that cannot be used."""

    line: int
    msg: str
    kind: str


class UploadReport(BaseModel):
    """What the row check of an upload found."""

    rows_total: int
    rows_valid: int
    rows_invalid: int
    formats: dict[str, int]
    errors: list[RowProblem] = Field(description="The first 100 bad lines")
    errors_truncated: bool = False


class DatasetOut(BaseModel):
    """An uploaded dataset; reference it from a spec as `dataset.train` / `dataset.eval`."""

    id: str = Field(examples=["ds_9f86d081884c7d659a2feaa0c55ad015"])
    filename: str
    size: int
    sha256: str
    format: str
    created_at: datetime
    report: UploadReport | None = None


class WebhookSecretOut(BaseModel):
    """The secret that signs this project's webhook deliveries (Standard Webhooks `whsec_` format)."""

    project: str
    secret: str = Field(examples=["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"])
    algorithm: str = (
        "HMAC-SHA256 over `webhook-id.webhook-timestamp.body`, header `webhook-signature: v1,<base64>`"
    )


class EstimateOut(BaseModel):
    """What a job will consume, computed before launch; `basis` says how each figure was obtained."""

    train_pairs: int
    eval_pairs: int
    train_tokens: int = Field(description="Tokens of one pass over the train pairs after truncation")
    eval_tokens: int = Field(description="Tokens of one pass over the eval pairs after truncation")
    steps: int = Field(description="Optimizer steps the run will take")
    steps_per_epoch: int
    batches_per_step: int = Field(
        description="Micro-batches per optimizer step and worker (grad_accum_steps)"
    )
    total_train_tokens: int = Field(description="Tokens the training steps consume (the loop's num_tokens)")
    parameters: int | None = Field(None, description="Model parameters, from its config (None: unknown)")
    flops_per_step: float | None = Field(None, description="Mean training FLOPs per optimizer step")
    total_flops: float | None = Field(None, description="Training steps plus the cached reference pass")
    duration_s: float | None = Field(
        None, description="Expected training time; null unless this cluster has measured throughput"
    )
    tokens_per_second: float | None = Field(None, description="The measured throughput duration_s uses")
    basis: dict[str, str] = Field(description="How tokens, steps, flops and duration_s were obtained")


class ValidationOut(BaseModel):
    """Result of a dry run: the spec as it would be accepted, the dataset report and the estimate."""

    valid: bool
    spec: dict[str, Any]
    model_is_hub_id: bool = False
    dataset: ValidationReport
    warnings: list[str] = Field(default_factory=list)
    estimate: EstimateOut | None = Field(None, description="Tokens, steps, FLOPs and expected duration")

"""Job spec: the pydantic v2 models shared by `minordpo train`, the API and the workers (DESIGN.md)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from core.data.hub import hub_name, is_hub_dataset
from core.loss_names import LOSS_NAMES

MAX_EVAL_GENERATIONS = 32
"""The most eval prompts a job may ask greedy completions of (training.eval_generations)."""
MAX_GENERATION_TEXT_CHARS = 4000
"""Each eval generation's prompt, chosen answer and completion are cut to this many characters."""
MAX_GENERATION_STEPS = 100
"""The eval steps whose generations a job keeps: the first and the latest 99 (each up to ~384 KB)."""

#: Upper bound of every step and row count in a spec (keeps each integer well inside 64 bits).
MAX_COUNT = 1_000_000_000
_JOB_ID = re.compile(r"^job_[0-9A-Za-z]{26}$")

DatasetFormat = Literal["auto", "standard", "conversational", "implicit_prompt", "openai"]


class StrictModel(BaseModel):
    """Base for every spec section: unknown fields are errors, values are validated on assignment."""

    # strict: `false` is not 0 and `"3"` is not 3; allow_inf_nan: JSON like 1e400 is not a number here.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, str_strip_whitespace=True, strict=True, allow_inf_nan=False
    )


def _path_or_from_job(schema: dict[str, Any]) -> None:
    """The JSON schema's view of `_chained_source`: a model needs `path` or `from_job`."""
    schema["required"] = [name for name in schema.get("required", []) if name != "path"]
    schema["anyOf"] = [{"required": ["path"]}, {"required": ["from_job"]}]


class ModelSpec(StrictModel):
    """Where the policy comes from. A bare string in a spec means ``{"path": ...}``."""

    model_config = ConfigDict(**StrictModel.model_config, json_schema_extra=_path_or_from_job)

    path: str = Field(
        min_length=1,
        max_length=4096,
        description="Local Hugging Face model folder, a job id (as from_job), or a hub id where the network "
        "allows; with from_job the service sets it to the resolved folder",
    )
    from_job: str | None = Field(
        None,
        pattern=r"^job_[0-9A-Za-z]{26}$",
        description="Start from this job's final model, or with `step` from one of its checkpoints "
        "(a job of the same project)",
    )
    step: int | None = Field(
        None, ge=0, le=MAX_COUNT, description="With from_job: the checkpoint step to start from"
    )
    revision: str | None = Field(None, max_length=256, description="Hub revision (ignored for local folders)")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    trust_remote_code: bool = Field(False, description="Refused unless the operator allows remote code")
    attn_implementation: Literal["auto", "sdpa", "eager", "flex_attention"] = Field(
        "auto",
        description="auto: flex_attention (a BlockMask over the packed rows) on CUDA, sdpa on CPU",
    )

    @model_validator(mode="before")
    @classmethod
    def _chained_source(cls, value: Any) -> Any:
        """`path: job_...` is `from_job: job_...`; a from_job alone gets its id as the path until resolved."""
        if not isinstance(value, dict):
            return value
        path, source = value.get("path"), value.get("from_job")
        if source is None and isinstance(path, str) and _JOB_ID.match(path.strip()):
            value = {**value, "from_job": path.strip()}
        elif path is None and isinstance(source, str):
            value = {**value, "path": source}
        elif path is None and source is None:
            raise ValueError("give model.path (a folder, job id or hub id) or model.from_job")
        return value

    @model_validator(mode="after")
    def _step_needs_source(self) -> ModelSpec:
        if self.step is not None and self.from_job is None:
            raise ValueError("model.step names a checkpoint of model.from_job; give from_job too")
        return self


class DatasetSpec(StrictModel):
    """The preference data: a file or folder path (or an uploaded dataset id) and how to split it."""

    train: str = Field(
        min_length=1,
        max_length=4096,
        description="Path to .jsonl/.json/.jsonl.gz/.parquet/load_from_disk folder, ds_<id>, or hf:OWNER/NAME",
    )
    eval: str | None = Field(None, max_length=4096, description="Held-out file; exclusive with eval_fraction")
    hub_split: str = Field("train", min_length=1, max_length=128, description="Split of an hf: train dataset")
    hub_eval_split: str = Field(
        "test", min_length=1, max_length=128, description="Split of an hf: eval dataset"
    )
    hub_subset: str | None = Field(None, max_length=128, description="Config (subset) name of hf: datasets")
    hub_data_dir: str | None = Field(
        None, max_length=512, description="data_dir inside hf: dataset repositories"
    )
    hub_revision: str | None = Field(
        None, max_length=256, description="Branch, tag or commit of hf: datasets"
    )
    eval_fraction: float = Field(0.0, ge=0.0, lt=0.5)
    format: DatasetFormat = "auto"
    on_bad_row: Literal["skip", "fail"] = Field(
        "skip", description="Skip rows that cannot be used, or fail the job"
    )
    max_rows: int | None = Field(None, ge=1, le=MAX_COUNT, description="Use only the first N usable rows")
    truncate_prompt: bool = Field(
        True,
        description="Cut long prompts from the left (keep their end); if false, rows with no room are bad rows",
    )

    @field_validator("train", "eval")
    @classmethod
    def _hub_id_shape(cls, value: str | None) -> str | None:
        if value is not None and is_hub_dataset(value):
            hub_name(value)  # ValueError names the value
        return value

    @field_validator("hub_data_dir")
    @classmethod
    def _relative_data_dir(cls, value: str | None) -> str | None:
        if value is not None and (
            value.startswith(("/", "\\", "~")) or ".." in value.replace("\\", "/").split("/")
        ):
            raise ValueError(
                "hub_data_dir must be a folder inside the dataset repository (no leading / and no ..)"
            )
        return value

    @model_validator(mode="after")
    def _one_eval_source(self) -> DatasetSpec:
        if self.eval and self.eval_fraction > 0:
            raise ValueError("give either dataset.eval or dataset.eval_fraction, not both")
        return self


class LossSpec(StrictModel):
    """Which loss (or weighted sum of losses) and its hyperparameters (TRL names)."""

    type: str | list[str] = Field(
        "minor_dpo",
        description=f"One of {', '.join(LOSS_NAMES)}, or a list of them; sft alone is an SFT job "
        "(trains on the chosen answers, no reference model)",
    )
    weights: list[Annotated[float, Field(ge=-1e6, le=1e6)]] | None = Field(
        None, max_length=32, description="One weight per loss type when type is a list"
    )
    beta: float = Field(0.1, gt=0.0, le=100.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="ε of cdpo, robust and exo_pair")
    discopop_tau: float = Field(0.05, gt=0.0, le=1e6)
    dpop_lambda: float = Field(50.0, ge=0.0, le=1e6)
    simpo_gamma: float = Field(0.5, ge=0.0, le=1e6)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.type,) if isinstance(self.type, str) else tuple(self.type)

    @property
    def is_sft(self) -> bool:
        """`type: sft` alone: supervised fine-tuning on the chosen answers, no reference (core.sft)."""
        return self.names == ("sft",)

    @property
    def weight_values(self) -> tuple[float, ...]:
        return tuple(self.weights) if self.weights is not None else (1.0,) * len(self.names)

    @field_validator("type")
    @classmethod
    def _known_loss(cls, value: str | list[str]) -> str | list[str]:
        for name in [value] if isinstance(value, str) else value:
            if name not in LOSS_NAMES:
                raise ValueError(f"unknown loss '{name}'; choose from {', '.join(LOSS_NAMES)}")
        return value

    @model_validator(mode="after")
    def _weights_match(self) -> LossSpec:
        if isinstance(self.type, list) and not self.type:
            raise ValueError("loss.type must name at least one loss")
        if self.weights is not None and len(self.weights) != len(self.names):
            raise ValueError(f"loss.weights has {len(self.weights)} entries for {len(self.names)} loss types")
        if self.is_sft and self.weights is not None and self.weights != [1.0]:
            raise ValueError("loss.weights: an sft job has one term and no weight; leave loss.weights out")
        return self

    def extra(self) -> dict[str, float]:
        """Keyword hyperparameters passed to every loss function."""
        return {
            "label_smoothing": self.label_smoothing,
            "discopop_tau": self.discopop_tau,
            "dpop_lambda": self.dpop_lambda,
            "simpo_gamma": self.simpo_gamma,
        }


class TrainingSpec(StrictModel):
    """Optimisation, schedule, evaluation and checkpoint cadence."""

    epochs: int = Field(1, ge=1, le=1000)
    max_steps: int | None = Field(
        None, ge=1, le=MAX_COUNT, description="Stop after this many optimizer steps (overrides epochs)"
    )
    batch_size: int = Field(
        8, ge=1, le=4096, description="Pairs per optimizer step per worker, before accumulation"
    )
    grad_accum_steps: int = Field(1, ge=1, le=1024)
    learning_rate: float = Field(5e-6, gt=0.0, le=1.0)
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = Field(0, ge=0, le=MAX_COUNT)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    adam_epsilon: float = Field(1e-8, gt=0.0, le=1.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0, le=1e6)
    max_length: int = Field(512, ge=8, le=131072)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    eval_every: int | None = Field(None, ge=1, le=MAX_COUNT)
    eval_generations: int = Field(
        0,
        ge=0,
        le=MAX_EVAL_GENERATIONS,
        description="At each eval, greedy completions of the first N eval prompts, stored per step (0 = off)",
    )
    eval_generation_tokens: int = Field(
        64, ge=1, le=512, description="Most new tokens of each eval generation"
    )
    checkpoint_every: int | None = Field(None, ge=1, le=MAX_COUNT)
    keep_checkpoints: int = Field(2, ge=1, le=1000)
    log_every: int = Field(1, ge=1, le=MAX_COUNT)
    precompute_ref_logps: bool = Field(
        True, description="One no-grad reference pass, cached on disk; else a live reference"
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Compute precision: bf16 = autocast over the weights as loaded (fp32 master weights with "
        "model.dtype float32), log-softmax and loss in fp32; auto = bf16 on CUDA GPUs that support it, else fp32",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute decoder-layer activations in backward (non-reentrant): less memory, more compute",
    )
    logps_chunk_size: int = Field(
        1024,
        ge=1,
        le=1_048_576,
        description="Completion positions per LM-head chunk: [chunk, vocab] logits at a time, recomputed in backward",
    )
    pairs_per_row: Annotated[int, Field(ge=1, le=4096)] | Literal["auto"] = Field(
        1,
        description="Up to this many pairs of a batch share one packed row of at most max_length tokens where that "
        "saves padding (attention never crosses pairs: same log-probs); auto = no count limit",
    )


class LoraSpec(StrictModel):
    """Low-rank adapters (peft); the reference is then the base model with adapters disabled."""

    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0.0, le=1e6)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: (
        Annotated[list[Annotated[str, Field(max_length=200)]], Field(max_length=256)] | Literal["all-linear"]
    ) = "all-linear"


class ResourcesSpec(StrictModel):
    """How much of the Ray cluster the job asks for."""

    num_workers: int = Field(1, ge=1, le=1024)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0, le=256)
    gpus_per_worker: float = Field(
        1.0, gt=0.0, le=64, description="GPUs each worker reserves when use_gpu (fractions share a GPU)"
    )
    accelerator_type: str | None = Field(
        None,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Run only on nodes with this Ray accelerator type, e.g. H100 or A100-80G",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places the workers' bundles across nodes"
    )
    max_retries: int = Field(1, ge=0, le=100, description="Worker-group restarts from the last checkpoint")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: a full model copy per worker; fsdp: FSDP2 shards weights, grads, optimizer"
    )

    def needs(self) -> dict[str, float]:
        """The cluster resources the whole job reserves: CPUs, and GPUs when it asks for them."""
        gpus = self.num_workers * self.gpus_per_worker if self.use_gpu else 0.0
        return {"CPU": self.num_workers * self.cpus_per_worker, "GPU": gpus}

    def worker_resources(self) -> dict[str, float]:
        """What one worker reserves (Ray Train's resources_per_worker)."""
        if self.use_gpu:
            return {"CPU": self.cpus_per_worker, "GPU": self.gpus_per_worker}
        return {"CPU": self.cpus_per_worker}


WebhookEvent = Literal["job.started", "job.succeeded", "job.failed", "job.cancelled", "job.checkpoint"]
WEBHOOK_EVENTS: tuple[str, ...] = (
    "job.started",
    "job.succeeded",
    "job.failed",
    "job.cancelled",
    "job.checkpoint",
)


class WebhookSpec(StrictModel):
    """An HTTP endpoint told about a job's start, checkpoints and end (signed per Standard Webhooks)."""

    url: str = Field(
        max_length=2048, pattern=r"^https?://[^\s/]+", description="http(s) URL that receives POSTs"
    )
    events: list[WebhookEvent] = Field(
        default_factory=lambda: list(WEBHOOK_EVENTS),
        min_length=1,
        description="Which deliveries to send (default: all)",
    )


class MlflowTrackingSpec(StrictModel):
    """Where the job's MLflow run goes (the server is the operator's MINORDPO_MLFLOW_TRACKING_URI)."""

    experiment: str = Field(
        "minordpo", min_length=1, max_length=256, description="MLflow experiment name (created if missing)"
    )
    run_name: str | None = Field(None, min_length=1, max_length=256, description="Default: the job's name")
    tags: dict[
        Annotated[str, Field(min_length=1, max_length=250)], Annotated[str, Field(max_length=5000)]
    ] = Field(default_factory=dict, max_length=50, description="Extra tags set on the run")
    log_model: bool = Field(
        False,
        description="Also upload the final model folder as the run's `model` artifact (its location is "
        "always recorded; the folder can be many GB)",
    )


class TrackingSpec(StrictModel):
    """Experiment trackers the job also reports to."""

    mlflow: MlflowTrackingSpec | None = None


class JobSpec(StrictModel):
    """A whole training job, as POSTed to `/v1/jobs` or given to `minordpo train`."""

    model_config = ConfigDict(
        extra="forbid",
        str_strip_whitespace=True,
        strict=True,
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [
                {
                    "name": "hh-minordpo",
                    "model": "var/models/tiny-llama",
                    "dataset": {
                        "train": "examples/data/hh-rlhf/harmless-base-test.jsonl.gz",
                        "eval_fraction": 0.05,
                    },
                    "loss": {"type": "minor_dpo", "beta": 0.1},
                    "training": {"max_steps": 50, "batch_size": 8, "learning_rate": 5e-6, "max_length": 512},
                    "resources": {"num_workers": 2, "use_gpu": False, "cpus_per_worker": 1},
                }
            ]
        },
    )

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._ -]*$")
    model: ModelSpec
    dataset: DatasetSpec
    loss: LossSpec = Field(default_factory=LossSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    lora: LoraSpec | None = None
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    group: str | None = Field(
        None,
        max_length=40,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Groups jobs for comparison (a sweep); list them with GET /v1/jobs?group=",
    )
    priority: int = Field(
        0,
        ge=-100,
        le=100,
        description="Dispatch order among the project's queued jobs: higher first, then oldest first "
        "(projects take turns whatever their priorities)",
    )
    webhooks: list[WebhookSpec] = Field(default_factory=list, max_length=10)
    tracking: TrackingSpec | None = Field(
        None,
        description="MLflow experiment, run name and tags (used when MINORDPO_MLFLOW_TRACKING_URI is set)",
    )

    @field_validator("webhooks")
    @classmethod
    def _one_entry_per_url(cls, hooks: list[WebhookSpec]) -> list[WebhookSpec]:
        urls = [h.url for h in hooks]
        if len(set(urls)) != len(urls):
            raise ValueError("each webhook URL may appear once (list all its events in one entry)")
        return hooks

    @field_validator("model", mode="before")
    @classmethod
    def _model_from_string(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @field_validator("model")
    @classmethod
    def _trainable_dtype(cls, value: ModelSpec) -> ModelSpec:
        if value.dtype == "float16":
            raise ValueError(
                "model.dtype float16 cannot be trained (fp16 gradients underflow without a loss scaler, "
                "which this service does not run); use bfloat16, or float32 with training.precision bf16"
            )
        return value

    @field_validator("training")
    @classmethod
    def _sft_has_no_reference(cls, value: TrainingSpec, info: ValidationInfo) -> TrainingSpec:
        loss = info.data.get("loss")  # validated before training (field order)
        if isinstance(loss, LossSpec) and loss.is_sft and not value.precompute_ref_logps:
            raise ValueError(
                "training.precompute_ref_logps: an sft job has no reference model, precomputed or live; "
                "leave the setting out"
            )
        return value

    @field_validator("training")
    @classmethod
    def _generations_need_eval(cls, value: TrainingSpec, info: ValidationInfo) -> TrainingSpec:
        dataset = info.data.get("dataset")  # validated before training (field order)
        if (
            value.eval_generations
            and isinstance(dataset, DatasetSpec)
            and not (dataset.eval or dataset.eval_fraction)
        ):
            raise ValueError(
                "training.eval_generations: generations come from eval prompts; "
                "give dataset.eval or dataset.eval_fraction"
            )
        return value


def error_lines(exc: ValidationError) -> list[str]:
    """One ``field.path: message`` line per validation error, for CLIs and logs."""
    lines = []
    for err in exc.errors():
        loc = (
            ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            or "(root)"
        )
        lines.append(f"{loc}: {err['msg']}")
    return lines

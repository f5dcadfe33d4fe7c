"""Ray Train worker side: runs the core loop on one rank, reports through `ray.train`, stops cooperatively."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as torch_dist
from torch import Tensor

from core.data import DatasetError
from core.data.limits import DataLimits
from core.models import ModelLoadError
from core.precision import compute_dtype
from core.sharding import fsdp_wrapper
from core.spec import JobSpec
from core.training import Distributed, RunOptions, Trainer, TrainingError
from workers.conventions import CANCEL_FILE, JobPolicy

log = logging.getLogger(__name__)


# Errors that a retry cannot fix: the same spec and data fail the same way again.
FATAL_ERRORS = (TrainingError, DatasetError, ModelLoadError)


class FatalJobError(RuntimeError):
    """A failure a retry cannot fix, in a form that pickles (TrainingError's constructor does not round-trip)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return (FatalJobError, (self.code, self.message))


def error_payload(exc: BaseException) -> dict[str, str]:
    """`{code, message}` for a loop failure, the shape of a job's `error` in the store."""
    if isinstance(exc, TrainingError | FatalJobError):
        return {"code": exc.code, "message": exc.message}
    if isinstance(exc, DatasetError):
        return {"code": "dataset_error", "message": str(exc)}
    if isinstance(exc, ModelLoadError):
        return {"code": "model_load_error", "message": str(exc)}
    return {"code": "worker_error", "message": f"{type(exc).__name__}: {exc}"}


def _numeric(values: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        if isinstance(value, bool | int | float) or (isinstance(value, Tensor) and value.numel() == 1):
            out[key] = float(value)
    return out


class RayReporter:
    """Reporter for one rank: metric rows and checkpoints go through `ray.train.report` (a barrier, so
    every rank reports at the same points), events go from rank 0 straight to the job channel.

    Events cannot use `report()`: the loop emits some of them (``final_model``) on rank 0 only.
    """

    def __init__(self, rank: int, channel: Any | None) -> None:
        self.rank = rank
        self.channel = channel

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        if self.rank != 0 or self.channel is None:
            return
        item = {"type": "event", "kind": kind, "message": message, "data": data or {}}
        try:  # synchronous so the driver's last drain after fit() sees it
            ray.get(self.channel.put.remote(item), timeout=30)
        except Exception as exc:  # noqa: BLE001 - a lost event must not kill training
            log.warning("could not forward event %s: %s", kind, exc)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        ray.train.report({**_numeric(values), "step": step})

    def checkpoint(self, step: int, path: Path | None, values: dict[str, float]) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(path)) if path is not None else None
        ray.train.report({**_numeric(values), "step": step}, checkpoint=checkpoint)

    def close(self) -> None:
        pass


class _Collectives:
    """Sum-reductions and the cancel broadcast over a gloo group on CPU float64 tensors.

    With NCCL as the main backend a separate gloo group is made, so CPU tensors always work.
    """

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.group = None
        if world_size > 1 and torch_dist.is_initialized() and torch_dist.get_backend() != "gloo":
            self.group = torch_dist.new_group(backend="gloo")

    @property
    def active(self) -> bool:
        return self.world_size > 1 and torch_dist.is_initialized()

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        if not self.active:
            return tensor
        buf = tensor.detach().to("cpu", torch.float64).clone()
        torch_dist.all_reduce(buf, op=torch_dist.ReduceOp.SUM, group=self.group)
        return buf.to(device=tensor.device, dtype=tensor.dtype)

    def broadcast_flag(self, flag: bool) -> bool:
        if not self.active:
            return flag
        buf = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
        torch_dist.broadcast(buf, src=0, group=self.group)
        return bool(buf.item() > 0)


def make_should_stop(rank: int, cancel_file: Path, collectives: _Collectives) -> Callable[[], bool]:
    """Rank 0 looks for the cancel file; the answer is broadcast so every rank stops on the same step.

    The loop calls this on every rank before every step, so the broadcast is symmetric. A gloo broadcast
    of one number costs well under a millisecond; `ray.train.collective.broadcast_from_rank_zero` (which
    goes through the controller) would cost a round-trip per step.
    """

    def should_stop() -> bool:
        wanted = rank == 0 and cancel_file.exists()
        return collectives.broadcast_flag(wanted)

    return should_stop


def limit_cpu_threads(cpus_per_worker: float) -> int:
    """Give torch as many intra-op threads as the CPUs reserved for this rank (at least one); returns it.

    Ray sets OMP_NUM_THREADS in a worker when its first task runs, but a warm process (workers/preload.py)
    imported torch before that, with one thread per core: two ranks on 2 cores then ran four threads.
    """
    threads = max(1, int(cpus_per_worker))
    torch.set_num_threads(threads)
    return threads


def _device(use_gpu: bool) -> torch.device:
    if use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def _result(result: Any) -> dict[str, Any]:
    final = result.final_model_dir
    return {
        "status": result.status,
        "step": result.step,
        "total_steps": result.total_steps,
        "final_model_dir": str(final) if final is not None else None,
        "metrics": _numeric(result.metrics),
        "eval_metrics": _numeric(result.eval_metrics),
        "error": None,
    }


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Entry point given to `TorchTrainer`: one rank of one job.

    config: ``spec`` (JobSpec JSON), ``output_dir``, ``cache_dir``, ``policy`` (a JobPolicy), ``channel``
    (actor handle of the job channel, or None). Returns rank 0's summary (Ray keeps it as
    ``Result.return_value``). A fatal loop error (TrainingError, DatasetError, ModelLoadError) is
    recorded in the channel and raised, so Ray tears the whole worker group down (no rank hangs in a
    collective); if Ray retries, the new group sees the record and returns it instead of failing again.
    """
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    spec = JobSpec.model_validate_json(config["spec"])
    output_dir = Path(config["output_dir"])
    channel = config.get("channel")

    if channel is not None:
        fatal = ray.get(channel.get_fatal.remote(), timeout=60)
        if fatal is not None:  # a retry after a deterministic failure: do not run it again
            return {
                "status": "failed",
                "step": 0,
                "total_steps": None,
                "final_model_dir": None,
                "error": fatal,
            }

    collectives = _Collectives(world_size)
    device = _device(spec.resources.use_gpu)
    if spec.resources.strategy == "fsdp" and torch_dist.is_initialized():  # FSDP2 (core.sharding)
        wrap_model = fsdp_wrapper(device, compute_dtype(spec.training.precision, device))
    else:
        wrap_model = ray.train.torch.prepare_model
    dist = Distributed(
        rank=rank,
        world_size=world_size,
        all_reduce_sum=collectives.all_reduce_sum if collectives.active else None,
        wrap_model=wrap_model,
    )
    cache = config.get("cache_dir")
    policy: JobPolicy = config.get("policy") or JobPolicy()
    options = RunOptions(
        output_dir=output_dir,
        cache_dir=Path(cache) if cache else None,
        device=device,
        allow_remote_code=policy.allow_remote_code,
        data_limits=DataLimits(**policy.data_limits),
        should_stop=make_should_stop(rank, output_dir / CANCEL_FILE, collectives),
    )
    reporter = RayReporter(rank, channel)
    threads = limit_cpu_threads(spec.resources.cpus_per_worker)
    reporter.event(
        "workers",
        f"{world_size} rank(s) on {options.device.type}, {threads} CPU thread(s) each",
        {"world_size": world_size, "device": options.device.type, "cpu_threads": threads},
    )
    checkpoint = ray.train.get_checkpoint()
    try:
        if checkpoint is None:
            return _result(Trainer(spec, options, reporter, dist).run())
        with checkpoint.as_directory() as folder:  # holds model/ + trainer_state.pt
            options.resume_from = Path(folder)
            return _result(Trainer(spec, options, reporter, dist).run())
    except FATAL_ERRORS as exc:
        payload = error_payload(exc)
        if channel is not None:
            try:
                ray.get(channel.set_fatal.remote({**payload, "rank": rank}), timeout=30)
            except Exception as err:  # noqa: BLE001
                log.warning("could not record the failure: %s", err)
        raise FatalJobError(payload["code"], payload["message"]) from None

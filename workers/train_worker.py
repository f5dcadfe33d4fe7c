"""Ray Train worker side: runs the core loop on one rank, reports through `ray.train`, stops cooperatively."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as torch_dist
from torch import Tensor

from core.data import DatasetError
from core.failures import JobFailure
from core.models import ModelLoadError
from core.training import Distributed, RunOptions, Trainer, TrainResult
from workers.launch_record import LaunchRecord
from workers.run_outcome import RunOutcome

log = logging.getLogger(__name__)


CANCEL_POLL_S = 0.5
"""How often rank 0 asks the job channel whether the driver asked the run to stop (one call in flight)."""


def loop_failure(exc: BaseException) -> JobFailure | None:
    """The JobFailure a loop error stands for, when a retry cannot fix it (the same spec and data fail the
    same way again); None for any other error, which Ray retries from the last checkpoint.

    Always the base class: the job channel's process unpickles it, and must not import the loop for it.
    """
    if isinstance(exc, JobFailure):  # TrainingError included
        return JobFailure(exc.code, exc.message, retryable=exc.retryable)
    if isinstance(exc, DatasetError):
        return JobFailure("dataset_error", str(exc))
    if isinstance(exc, ModelLoadError):
        return JobFailure("model_load_error", str(exc))
    return None


def _numeric(values: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        if isinstance(value, bool | int | float) or (isinstance(value, Tensor) and value.numel() == 1):
            out[key] = float(value)
    return out


class RayReporter:
    """Reporter for one rank: metric rows and checkpoints go through `ray.train.report` (a barrier, so
    every rank reports at the same points), events and eval generations go from rank 0 straight to the
    job channel.

    Events cannot use `report()`: the loop emits some of them (``final_model``) on rank 0 only.
    """

    def __init__(self, rank: int, channel: Any | None) -> None:
        self.rank = rank
        self.channel = channel

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self._put({"type": "event", "kind": kind, "message": message, "data": data or {}})

    def generations(self, step: int, samples: list[dict[str, Any]]) -> None:
        self._put({"type": "generations", "step": step, "samples": samples})

    def _put(self, item: dict[str, Any]) -> None:
        if self.rank != 0 or self.channel is None:
            return
        try:  # synchronous so the driver's last drain after fit() sees it
            ray.get(self.channel.put.remote(item), timeout=30)
        except Exception as exc:  # noqa: BLE001 - a lost event must not kill training
            log.warning("could not forward %s %s: %s", item["type"], item.get("kind", ""), exc)

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


class CancelWatch:
    """Rank 0's view of the channel's cancel flag, asked without blocking the loop.

    At most one `cancel_requested` call is in flight, and a new one is sent at most every `poll_s`; a
    step only looks whether the answer has come (`ray.wait` with no timeout).
    """

    def __init__(self, channel: Any, poll_s: float = CANCEL_POLL_S) -> None:
        self.channel = channel
        self.poll_s = poll_s
        self._pending: Any = None
        self._asked_at = float("-inf")
        self._cancelled = False

    def requested(self) -> bool:
        if self._cancelled:
            return True
        if self._pending is None:
            if time.monotonic() - self._asked_at >= self.poll_s:
                self._pending, self._asked_at = self.channel.cancel_requested.remote(), time.monotonic()
            return False
        ready, _ = ray.wait([self._pending], timeout=0)
        if ready:
            pending, self._pending = self._pending, None
            try:
                self._cancelled = bool(ray.get(pending))
            except Exception as exc:  # noqa: BLE001 - a lost channel must not stop training
                log.warning("could not ask the job channel for a cancel: %s", exc)
        return self._cancelled


def make_should_stop(rank: int, channel: Any | None, collectives: _Collectives) -> Callable[[], bool]:
    """Rank 0 asks the job channel (CancelWatch); the answer is broadcast so every rank stops on the same step.

    The loop calls this on every rank before every step, so the broadcast is symmetric. A gloo broadcast
    of one number is cheap; `ray.train.collective.broadcast_from_rank_zero` (which goes through the
    controller) would cost a round-trip per step.
    """
    watch = CancelWatch(channel) if rank == 0 and channel is not None else None

    def should_stop() -> bool:
        return collectives.broadcast_flag(watch is not None and watch.requested())

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


def _outcome(result: TrainResult) -> RunOutcome:
    return RunOutcome(
        "succeeded" if result.status == "completed" else "cancelled",
        result.step,
        result.total_steps,
        final_model_dir=result.final_model_dir,
    )


def train_loop_per_worker(config: dict[str, Any]) -> RunOutcome:
    """Entry point given to `TorchTrainer`: one rank of one job.

    config: ``launch`` (the job's LaunchRecord, as the driver built it: its spec is not validated
    again) and ``channel`` (actor handle of the job channel, or None). Returns rank 0's RunOutcome (Ray
    keeps it as ``Result.return_value``). A failure a retry cannot fix (`loop_failure`) is recorded in
    the channel and raised as a JobFailure, so Ray tears the whole worker group down (no rank hangs in a
    collective); if Ray retries, the new group sees the record and returns it instead of failing again.
    """
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    launch: LaunchRecord = config["launch"]
    spec = launch.spec
    channel = config.get("channel")

    if channel is not None:
        fatal = ray.get(channel.get_fatal.remote(), timeout=60)
        if fatal is not None:  # a retry after a deterministic failure: do not run it again
            return RunOutcome.failed(fatal)

    collectives = _Collectives(world_size)
    device = _device(spec.resources.use_gpu)
    dist = Distributed(
        rank=rank,
        world_size=world_size,
        all_reduce_sum=collectives.all_reduce_sum if collectives.active else None,
        wrap_model=ray.train.torch.prepare_model,  # DDP; under fsdp the loop shards the model itself
    )
    options = RunOptions(
        output_dir=launch.output_dir,
        cache_dir=launch.cache_dir,
        device=device,
        allow_remote_code=launch.allow_remote_code,
        data_limits=launch.data_limits,
        should_stop=make_should_stop(rank, channel, collectives),
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
            return _outcome(Trainer(spec, options, reporter, dist).run())
        with checkpoint.as_directory() as folder:  # holds model/ + trainer_state.pt
            options.resume_from = Path(folder)
            return _outcome(Trainer(spec, options, reporter, dist).run())
    except Exception as exc:
        failure = loop_failure(exc)
        if failure is None:
            raise  # Ray retries the worker group from the last checkpoint
        if channel is not None:
            try:
                ray.get(channel.set_fatal.remote(failure), timeout=30)
            except Exception as err:  # noqa: BLE001
                log.warning("could not record the failure: %s", err)
        raise failure from None

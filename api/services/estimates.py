"""The estimate's inputs (API side): a model's parameter count from its config, and this cluster's throughput."""

from __future__ import annotations

import functools
import logging
import math
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select

from api.errors import ProblemError
from api.services.hub_loads import HubLoads
from core.estimate import Throughput
from core.spec import JobSpec, ResourcesSpec
from core.store import Database, Job, JobStatus, metric_series

log = logging.getLogger("api.estimate")

#: Succeeded jobs (newest first) looked at for throughput.
HISTORY_JOBS = 200
#: Jobs of "a similar size class" have parameter counts within this factor of each other.
SIZE_FACTOR = 2.0

#: `(parameters, spec) -> measured throughput or None`, given to validate_spec.
History = Callable[[int | None, JobSpec], Throughput | None]


def count_parameters(config: Any) -> int:
    """Parameters of the causal LM a config describes (shared tensors once), built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=256)
def _local_parameters(path: str, _mtime: float) -> int:
    from transformers import AutoConfig

    return count_parameters(AutoConfig.from_pretrained(path, trust_remote_code=False))


def local_parameters(path: str) -> int | None:
    """The parameter count of a local model folder's config (None when it has no usable config)."""
    config = Path(path) / "config.json"
    try:
        return _local_parameters(path, os.path.getmtime(config))
    except Exception as exc:  # noqa: BLE001 - missing, unreadable or unknown configs all mean "unknown"
        log.debug("no parameter count for %s: %s", path, exc)
        return None


def model_parameters(path: str, is_hub_id: bool, hub: HubLoads) -> tuple[int | None, str]:
    """(parameters, how they were obtained) for the model a spec trains."""
    if not is_hub_id:
        count = local_parameters(path)
        return count, "counted from config.json" if count else "the model folder's config.json cannot be read"

    def load() -> int:
        from transformers import AutoConfig

        return count_parameters(AutoConfig.from_pretrained(path, trust_remote_code=False))

    try:
        return hub.run(path, load), "counted from the hub config"
    except ProblemError as exc:
        return None, f"the hub config of '{path}' cannot be loaded ({exc.detail})"
    except Exception as exc:  # noqa: BLE001
        return None, f"the hub config of '{path}' cannot be read ({type(exc).__name__})"


def same_resources(a: ResourcesSpec, b: ResourcesSpec) -> bool:
    """Resources that give comparable throughput: devices, worker count, strategy, GPU share and type."""
    keys = ("use_gpu", "num_workers", "strategy", "accelerator_type")
    if any(getattr(a, k) != getattr(b, k) for k in keys):
        return False
    return not a.use_gpu or a.gpus_per_worker == b.gpus_per_worker


def similar_size(a: int, b: int) -> bool:
    return a > 0 and b > 0 and abs(math.log(a / b)) <= math.log(SIZE_FACTOR)


def job_tokens_per_second(db: Database, job_id: str) -> float | None:
    """A job's training throughput: num_tokens gained over wall time between its first and last metric rows."""
    with db.read() as session:
        rows = metric_series(session, job_id, names=["num_tokens"], max_points=2).data
    if len(rows) < 2:
        return None
    first, last = rows[0], rows[-1]
    tokens = (last.values.get("num_tokens") or 0.0) - (first.values.get("num_tokens") or 0.0)
    seconds = last.time - first.time
    return tokens / seconds if tokens > 0 and seconds > 0 else None


def cluster_history(db: Database) -> History:
    """Measured throughput of earlier succeeded jobs (any project) of a similar size on the same resources."""

    def lookup(parameters: int | None, spec: JobSpec) -> Throughput | None:
        if parameters is None:
            return None
        with db.read() as session:
            rows = session.execute(
                select(Job.id, Job.spec)
                .where(Job.status == JobStatus.SUCCEEDED.value)
                .order_by(Job.seq.desc())
                .limit(HISTORY_JOBS)
            ).all()
        rates = []
        for job_id, stored in rows:
            try:
                resources = ResourcesSpec.model_validate(stored.get("resources") or {})
                path = str((stored.get("model") or {})["path"])
            except (ValidationError, KeyError, TypeError):
                continue
            if not same_resources(resources, spec.resources):
                continue
            size = local_parameters(path)
            if size is None or not similar_size(size, parameters):
                continue
            rate = job_tokens_per_second(db, job_id)
            if rate is not None:
                rates.append(rate)
        if not rates:
            return None
        r = spec.resources
        device = f"{r.gpus_per_worker:g} GPU ({r.accelerator_type or 'any type'})" if r.use_gpu else "CPU"
        return Throughput(
            statistics.median(rates),
            f"median of {len(rates)} succeeded job(s) on this cluster with parameters within a factor of "
            f"{SIZE_FACTOR:g} of {parameters} and the same resources ({r.num_workers} worker(s), {device} "
            f"per worker, {r.strategy}), each measured between its first and last reported training step",
        )

    return lookup

"""Chained jobs (API side): `model.from_job` (and `step`) to the model folder a worker loads, same project only."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from api.errors import invalid, not_found
from api.services.auth import Principal
from core.schemas import DerivedJob, DerivedJobList
from core.store import Database, Job, JobStatus, final_model_path, get_job, list_checkpoints

#: Where checkpoint steps become loadable model folders: `<artifacts_dir>/chained/<job id>/step-N`.
CHAINED_DIR = "chained"
_DONE = ".complete"


@dataclass(frozen=True)
class SourceJob:
    """What the store says about a source job: its status, spec, final model and checkpoint folders."""

    id: str
    status: str
    spec: dict[str, Any]
    final_model: str | None
    checkpoints: dict[int, str]


def read_source(db: Database, principal: Principal, job_id: str) -> SourceJob:
    """The source job as visible to the caller; 404 (as for an unknown id) when another project owns it."""
    with db.read() as session:
        job = get_job(session, job_id, project=principal.scope)
        if job is None:
            raise not_found("job", job_id)
        return SourceJob(
            job.id,
            job.status,
            dict(job.spec),
            final_model_path(session, job_id),
            {c.step: c.path for c in list_checkpoints(session, job_id)},
        )


def final_folder(source: SourceJob) -> str:
    """A succeeded job's final model folder (LoRA adapters already merged into it by the worker)."""
    if source.status != JobStatus.SUCCEEDED.value or source.final_model is None:
        steps = available_steps(source)
        hint = f"; or name one of its checkpoints with model.step ({_listed(steps)})" if steps else ""
        raise invalid(
            "model.from_job",
            f"job '{source.id}' has not saved a final model (status {source.status}): chain from a "
            f"succeeded job{hint}",
        )
    if not Path(source.final_model).is_dir():
        raise invalid("model.from_job", f"the final model folder of job '{source.id}' no longer exists")
    return str(Path(source.final_model).resolve())


def available_steps(source: SourceJob) -> list[int]:
    """Checkpoint steps whose folders still exist (older ones are rotated away by keep_checkpoints)."""
    return sorted(step for step, path in source.checkpoints.items() if Path(path).is_dir())


def _listed(steps: list[int]) -> str:
    return "available steps: " + (", ".join(str(s) for s in steps) if steps else "none")


def checkpoint_folder(source: SourceJob, step: int, artifacts_dir: Path) -> str:
    """A loadable folder for checkpoint `step`: its weights hard-linked beside the source's tokenizer.

    A checkpoint holds the policy only (no tokenizer), so the folder is assembled once under
    `<artifacts_dir>/chained/` and reused; hard links keep it whole after the source rotates the
    checkpoint away. LoRA checkpoints (adapter weights only) and FSDP sharded (DCP) checkpoints are
    refused: turning them into a full model would load the whole model here, in the API.
    """
    steps = available_steps(source)
    if step not in steps:
        raise invalid("model.step", f"job '{source.id}' has no checkpoint at step {step}; {_listed(steps)}")
    checkpoint = Path(source.checkpoints[step])
    if (checkpoint / "sharded").is_dir():
        raise invalid(
            "model.step",
            f"checkpoint {step} of job '{source.id}' is an FSDP sharded (DCP) checkpoint, which cannot be "
            "chained from; chain from the job's final model (a full folder) instead",
        )
    weights = checkpoint / "model"
    if (weights / "adapter_config.json").exists():
        raise invalid(
            "model.step",
            f"checkpoint {step} of job '{source.id}' holds LoRA adapter weights only; chain from the "
            "job's final model (adapters merged) instead",
        )
    if not (weights / "config.json").is_file():
        raise invalid("model.step", f"checkpoint {step} of job '{source.id}' holds no model folder")
    target = artifacts_dir.resolve() / CHAINED_DIR / source.id / f"step-{step:07d}"
    if not (target / _DONE).exists():
        _assemble(target, weights, _tokenizer_source(source))
    return str(target)


def _tokenizer_source(source: SourceJob) -> str:
    """A local folder with the source job's tokenizer: its final model, else the model it trained from."""
    for candidate in (source.final_model, (source.spec.get("model") or {}).get("path")):
        if isinstance(candidate, str) and Path(candidate).is_dir():
            return candidate
    raise invalid(
        "model.step",
        f"the checkpoints of job '{source.id}' hold no tokenizer and its model is not a local folder; "
        "chain from the job's final model instead",
    )


def _assemble(target: Path, weights: Path, tokenizer_dir: str) -> None:
    """Write the folder under a temporary name and rename it into place (a concurrent twin wins harmlessly)."""
    from transformers import AutoTokenizer

    tmp = target.with_name(f".tmp-{target.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        for file in weights.iterdir():
            if file.is_file():
                _link_or_copy(file, tmp / file.name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
        except Exception as exc:  # transformers raises OSError, ValueError, ...
            raise invalid("model.step", f"cannot load the source job's tokenizer: {exc}") from exc
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE).touch()
        shutil.rmtree(target, ignore_errors=True)  # a half-written folder of a crashed earlier try
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / _DONE).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def source_model_lookup(
    db: Database, principal: Principal, artifacts_dir: Path
) -> Callable[[str, int | None], str]:
    """`(from_job, step)` -> the model folder the new job trains from; 404 / 422 problems otherwise."""

    def resolve(job_id: str, step: int | None) -> str:
        source = read_source(db, principal, job_id)
        return final_folder(source) if step is None else checkpoint_folder(source, step, artifacts_dir)

    return resolve


def derived_jobs(db: Database, principal: Principal, job_id: str) -> DerivedJobList:
    """Jobs (visible to the caller) that start from `job_id`'s final model or checkpoints, oldest first."""
    source = Job.spec[("model", "from_job")].as_string()
    query = select(Job.id, Job.name, Job.status, Job.spec).where(source == job_id).order_by(Job.seq)
    if principal.scope is not None:
        query = query.where(Job.project == principal.scope)
    with db.read() as session:
        if get_job(session, job_id, project=principal.scope) is None:
            raise not_found("job", job_id)
        rows = session.execute(query).all()
    return DerivedJobList(
        data=[
            DerivedJob(
                id=r.id, name=r.name, status=r.status, source_step=(r.spec.get("model") or {}).get("step")
            )
            for r in rows
        ]
    )

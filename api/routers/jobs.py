"""Job routes: create, validate, list, get, cancel, metrics, checkpoints, eval generations (logic in api.services)."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Path, Query, Request, Response

from api.deps import DbDep, PrincipalDep, SettingsDep
from api.errors import PROBLEM_JSON, Problem
from api.services import jobs as service
from api.services.auth import Principal
from api.services.chained_models import derived_jobs, source_model_lookup
from api.services.estimates import cluster_history
from api.services.generations import job_generations
from api.services.hub_datasets import hub_dataset_lookup
from api.services.specs import SpecLookups, check_spec
from api.services.validation import validate_spec
from core.schemas import (
    CheckpointList,
    DerivedJobList,
    JobGenerations,
    JobOut,
    JobPage,
    MetricSeries,
    ValidationOut,
)
from core.settings import Settings
from core.spec import JobSpec
from core.store import Database

PROBLEMS = {
    code: {"model": Problem, "content": {PROBLEM_JSON: {}}, "description": text}
    for code, text in {
        401: "Missing or invalid bearer token",
        404: "No such job (or it belongs to another project)",
        413: "Request body too large (`:validate`: the dataset file over MINORDPO_MAX_DATASET_BYTES)",
        422: "Invalid spec or parameters: `errors` names each field",
    }.items()
}
router = APIRouter(prefix="/v1", tags=["jobs"], responses=PROBLEMS)
JobId = Annotated[str, Path(description="Job id, e.g. job_01jd3m5k8q9t0v1w2x3y4z5a6b", max_length=64)]
#: The largest integer a query parameter takes (the databases' 64-bit integers).
MAX_INT64 = 2**63 - 1
StatusFilter = Literal["queued", "running", "succeeded", "failed", "cancelled"]


@router.post(
    "/jobs",
    status_code=201,
    response_model=JobOut,
    summary="Create a job",
    responses={
        200: {"model": JobOut, "description": "Replay: this Idempotency-Key already created the job"},
        409: {
            "model": Problem,
            "content": {PROBLEM_JSON: {}},
            "description": "Idempotency-Key reused with another body",
        },
    },
)
def create_job(
    spec: JobSpec,
    request: Request,
    response: Response,
    db: DbDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)] = None,
) -> JobOut:
    """Queue a training job. Local paths must lie under the allowed roots; `ds_...` ids name uploaded datasets."""
    checked = check_spec(spec, settings, _lookups(request, db, settings, principal))
    job, created = service.create(db, principal, checked, idempotency_key)
    if not created:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job


def _lookups(request: Request, db: Database, settings: Settings, principal: Principal) -> SpecLookups:
    """The caller's id lookups, with `hf:` datasets loaded on the app's hub threads (the tokenizers' HubLoads)."""
    hub = request.app.state.tokenizers.hub
    lookups = service.spec_lookups(db, principal, hub_dataset=hub_dataset_lookup(settings, hub))
    return replace(lookups, source_model=source_model_lookup(db, principal, settings.artifacts_dir))


@router.post(
    "/jobs:validate",
    response_model=ValidationOut,
    summary="Dry run: check a spec and its dataset",
    responses={
        503: {
            "model": Problem,
            "content": {PROBLEM_JSON: {}},
            "description": "Every slot for loading a tokenizer from the hub is busy: retry after Retry-After seconds",
        }
    },
)
def validate_job(
    spec: JobSpec, request: Request, db: DbDep, settings: SettingsDep, principal: PrincipalDep
) -> ValidationOut:
    """Check the spec, the path policy and the dataset (rows, bad lines, token lengths, truncation) without queuing."""
    checked = check_spec(spec, settings, _lookups(request, db, settings, principal))
    tokenizers = request.app.state.tokenizers
    return validate_spec(checked, tokenizers, settings.data_limits(), history=cluster_history(db))


@router.get("/jobs", response_model=JobPage, summary="List jobs, newest first")
def list_jobs(
    db: DbDep,
    principal: PrincipalDep,
    status: Annotated[StatusFilter | None, Query(description="Only jobs in this state")] = None,
    group: Annotated[
        str | None, Query(description="Only jobs of this group (spec.group)", max_length=40)
    ] = None,
    after: Annotated[
        str | None, Query(description="next_cursor of the previous page", max_length=200)
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> JobPage:
    """The caller's jobs (every project's for the admin); follow next_cursor until it is null."""
    return service.list_page(db, principal, status=status, after=after, limit=limit, group=group)


@router.get("/jobs/{job_id}", response_model=JobOut, summary="Get a job")
async def get_job(job_id: JobId, db: DbDep, principal: PrincipalDep) -> Response:
    """Status, spec, times, progress, latest metrics, error and queue position."""
    job = await service.get_async(db, principal, job_id)
    return Response(  # already a JobOut: serialised once, not validated again by FastAPI
        job.model_dump_json(), media_type="application/json"
    )


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, summary="Request cancellation (idempotent)")
def cancel_job(job_id: JobId, db: DbDep, principal: PrincipalDep) -> JobOut:
    """A queued job is cancelled at once; a running one gets cancel_requested and stops at the next step."""
    return service.cancel(db, principal, job_id)


@router.get("/jobs/{job_id}/metrics", response_model=MetricSeries, summary="Metric time series")
def job_metrics(
    job_id: JobId,
    db: DbDep,
    principal: PrincipalDep,
    after_step: Annotated[
        int | None, Query(ge=-1, le=MAX_INT64, description="Only steps after this one")
    ] = None,
    names: Annotated[list[str] | None, Query(description="Metric names (repeat or comma-separate)")] = None,
    max_points: Annotated[
        int | None, Query(ge=2, le=100_000, description="Downsample to this many rows")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
) -> Response:
    """Rows `{step, time, <name>: value}`; downsampling keeps the first and last point."""
    series = service.metrics(
        db,
        principal,
        job_id,
        after_step=after_step,
        names=service.parse_names(names),
        max_points=max_points,
        limit=limit,
    )
    return Response(service.series_json(series), media_type="application/json")


@router.get("/jobs/{job_id}/derived", response_model=DerivedJobList, summary="Jobs chained from a job")
def job_derived(job_id: JobId, db: DbDep, principal: PrincipalDep) -> DerivedJobList:
    """Jobs whose `model.from_job` is this job (its final model, or a checkpoint: source_step), oldest first."""
    return derived_jobs(db, principal, job_id)


@router.get("/jobs/{job_id}/checkpoints", response_model=CheckpointList, summary="Checkpoints of a job")
def job_checkpoints(job_id: JobId, db: DbDep, principal: PrincipalDep) -> CheckpointList:
    """Saved checkpoints by step; the final model is a Hugging Face folder."""
    return service.checkpoints(db, principal, job_id)


@router.get("/jobs/{job_id}/generations", response_model=JobGenerations, summary="Eval generations of a job")
def job_generations_route(
    job_id: JobId,
    db: DbDep,
    principal: PrincipalDep,
    step: Annotated[
        int | None, Query(ge=0, le=MAX_INT64, description="This eval step (default: the latest)")
    ] = None,
) -> JobGenerations:
    """Greedy completions of the fixed eval prompts beside their chosen answers (`training.eval_generations`)."""
    return job_generations(db, principal, job_id, step)

"""Turn a request body into a checked JobSpec: schema, remote-code policy, path policy, dataset and job ids."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError

from api.errors import ProblemError, invalid, pydantic_errors, summary
from api.services.paths import PathPolicy, ResolvedPath, resolve_dataset_file, resolve_model
from core.settings import Settings
from core.spec import JobSpec, ModelSpec

DATASET_ID = re.compile(r"^ds_[0-9a-f]{8,64}$")
JOB_ID = re.compile(r"^job_[0-9A-Za-z]{26}$")


@dataclass(frozen=True)
class SpecLookups:
    """How a spec's ids become stored paths, as visible to the caller's project (None when not visible)."""

    dataset: Callable[[str], str | None]
    final_model: Callable[[str], str | None] = lambda _job_id: None
    #: `model.from_job` (+ `step`) -> the model folder to train from; raises 404 / 422 problems
    source_model: Callable[[str, int | None], str] | None = None
    #: `hf:` datasets: (value, field, DatasetSpec, is_eval) -> saved local folder (None: refused here)
    hub_dataset: Callable[[str, str, Any, bool], str] | None = None


def path_policy(settings: Settings) -> PathPolicy:
    """The operator's roots and the service's own files."""
    return PathPolicy(settings.allowed_roots(), settings.service_owned_paths())


def parse_spec(body: Any) -> JobSpec:
    """Validate a JSON body against JobSpec; 422 with one `{loc, msg}` per bad field."""
    if not isinstance(body, dict):
        raise ProblemError(
            422,
            "The request body must be a JSON object (a job spec)",
            errors=[{"loc": "(body)", "msg": "not an object"}],
        )
    try:
        return JobSpec.model_validate(body)
    except ValidationError as exc:
        errors = pydantic_errors(list(exc.errors()), skip_body=False)
        raise ProblemError(422, summary(errors), errors=errors) from exc


def _dataset_value(
    value: str, field: str, policy: PathPolicy, lookups: SpecLookups, dataset: Any = None
) -> str:
    """A dataset id's stored file, a hub dataset's saved folder (lookups.hub_dataset), or a checked local path."""
    if DATASET_ID.match(value):
        stored = lookups.dataset(value)
        if stored is None:
            raise invalid(field, f"unknown dataset id '{value}'")
        return stored
    resolved = resolve_dataset_file(value, field, policy)
    if resolved.is_hub_id:
        if lookups.hub_dataset is None:
            raise invalid(field, f"hub datasets ('{value}') are not available here")
        return lookups.hub_dataset(value, field, dataset, field == "dataset.eval")
    return resolved.value


@dataclass(frozen=True)
class CheckedSpec:
    """A spec as given, the copy to store (local paths absolute and real, dataset ids to files), and the mapping."""

    original: JobSpec
    resolved: JobSpec
    paths: dict[str, str]
    model_is_hub_id: bool


def check_spec(spec: JobSpec, settings: Settings, lookups: SpecLookups) -> CheckedSpec:
    """Apply the operator's policies (remote code, path roots, dataset ids); 422 naming every bad field."""
    errors: list[dict[str, str]] = []
    if spec.model.trust_remote_code and not settings.allow_remote_code:
        errors.append(
            {
                "loc": "model.trust_remote_code",
                "msg": "remote code is disabled on this server (the operator can set MINORDPO_ALLOW_REMOTE_CODE=true)",
            }
        )
    errors.extend(webhook_host_errors(spec, settings))
    resolved: dict[str, str] = {}
    policy = path_policy(settings)
    model = resolve_model_or_error(spec.model, policy, lookups, errors)
    checks: list[tuple[str, str, Callable[[], str]]] = [
        (
            "dataset.train",
            spec.dataset.train,
            lambda: _dataset_value(spec.dataset.train, "dataset.train", policy, lookups, spec.dataset),
        ),
    ]
    if spec.dataset.eval:
        eval_value = spec.dataset.eval
        checks.append(
            (
                "dataset.eval",
                eval_value,
                lambda: _dataset_value(eval_value, "dataset.eval", policy, lookups, spec.dataset),
            )
        )
    for field, _value, resolve in checks:
        try:
            resolved[field] = resolve()
        except ProblemError as exc:
            errors.extend(exc.errors or [{"loc": field, "msg": exc.detail}])
    if errors:
        detail = "; ".join(f"{e['loc']}: {e['msg']}" for e in errors)
        raise ProblemError(422, detail, errors=errors)
    assert model is not None
    dataset = spec.dataset.model_copy(
        update={"train": resolved["dataset.train"], "eval": resolved.get("dataset.eval", spec.dataset.eval)}
    )
    resolved_spec = spec.model_copy(
        update={"model": spec.model.model_copy(update={"path": model.value}), "dataset": dataset}
    )
    paths = {spec.dataset.train: resolved["dataset.train"]}
    if spec.dataset.eval:
        paths.setdefault(spec.dataset.eval, resolved["dataset.eval"])  # an eval of the train's hf: id differs
    return CheckedSpec(spec, resolved_spec, paths, model.is_hub_id)


def webhook_host_errors(spec: JobSpec, settings: Settings) -> list[dict[str, str]]:
    """Webhook URLs whose host is outside MINORDPO_WEBHOOK_ALLOWED_HOSTS (keeps tenants off internal hosts)."""
    patterns = [p.strip().lower() for p in settings.webhook_allowed_hosts.split(",") if p.strip()]
    errors = []
    for index, hook in enumerate(spec.webhooks):
        try:
            host = (urlsplit(hook.url).hostname or "").lower()
            httpx.URL(hook.url)
        except (ValueError, httpx.InvalidURL) as exc:
            errors.append({"loc": f"webhooks.{index}.url", "msg": f"not a usable URL: {exc}"})
            continue
        if not any(fnmatch(host, pattern) for pattern in patterns):
            errors.append(
                {
                    "loc": f"webhooks.{index}.url",
                    "msg": f"host '{host}' is not allowed for webhooks on this server (MINORDPO_WEBHOOK_ALLOWED_HOSTS)",
                }
            )
    return errors


def resolve_model_or_error(
    model: ModelSpec, policy: PathPolicy, lookups: SpecLookups, errors: list[dict[str, str]]
) -> ResolvedPath | None:
    """`from_job` (or a job id as path) names that job's final model or checkpoint (same project only; an
    unseen job is a 404); else resolve_model. 422 errors are collected."""
    try:
        if model.from_job is not None:
            return ResolvedPath(_source_model(model.from_job, model.step, lookups))
        return resolve_model(model.path, "model.path", policy)
    except ProblemError as exc:
        if exc.status != 422:
            raise
        errors.extend(exc.errors or [{"loc": "model.path", "msg": exc.detail}])
        return None


def _source_model(job_id: str, step: int | None, lookups: SpecLookups) -> str:
    if lookups.source_model is not None:
        return lookups.source_model(job_id, step)
    final = lookups.final_model(job_id) if step is None else None
    if final is None:
        raise invalid("model.from_job", f"job '{job_id}' does not exist or has not saved a final model")
    return final


def spec_from_body(body: Any, settings: Settings, lookups: SpecLookups) -> CheckedSpec:
    """parse_spec + check_spec."""
    return check_spec(parse_spec(body), settings, lookups)

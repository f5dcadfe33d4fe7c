"""Dispatch order and per-project quotas (pure, dispatcher side): which queued jobs start now, why the rest wait.

Order: fair among projects (the project with the fewest running jobs goes next; ties go to the project
whose oldest job has waited longest), then `spec.priority` within a project (higher first), then
submission order. A project at its quota waits without holding up other projects. Cluster capacity is
first come in that order: the first job that does not fit in the free CPUs/GPUs holds the jobs after
it, so a stream of small jobs cannot starve a big one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_QUOTA_KEY = "default"
"""The MINORDPO_PROJECT_QUOTAS entry for projects it does not name."""
QUOTA_SETTING = "MINORDPO_PROJECT_QUOTAS"
Capacity = dict[str, float]
#: How each resource a job reserves is named in messages: (plural, how the spec asks for it).
RESOURCE_WORDS = {
    "CPU": ("CPUs", "resources.num_workers x cpus_per_worker"),
    "GPU": ("GPUs", "resources.num_workers x gpus_per_worker, with use_gpu"),
}


@dataclass(frozen=True)
class ProjectQuota:
    """What one project may use at once; None: no limit of that kind."""

    max_jobs: int | None = None
    max_workers: int | None = None
    max_gpus: float | None = None


QUOTA_KEYS = ("max_jobs", "max_workers", "max_gpus")


def _limit(where: str, key: str, value: Any) -> int | float | None:
    whole = key != "max_gpus"
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (whole and not isinstance(value, int))
    ):
        kind = "a whole number" if whole else "a number"
        raise ValueError(f"{QUOTA_SETTING}: {where}.{key} must be {kind} or null, not {value!r}")
    if whole and value < 1:
        raise ValueError(f"{QUOTA_SETTING}: {where}.{key} must be at least 1")
    if value <= 0:
        raise ValueError(f"{QUOTA_SETTING}: {where}.{key} must be above 0")
    return value


def parse_project_quotas(raw: str | Mapping[str, Any] | None) -> dict[str, ProjectQuota]:
    """`{"default": {"max_jobs": 2}, "team-a": {"max_jobs": 4, "max_gpus": 8}}` (JSON text or a mapping)
    -> quota per project name; raises ValueError naming the bad entry or key."""
    from core.store.projects import PROJECT_NAME_RE

    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{QUOTA_SETTING} is not valid JSON: {exc}") from None
    if not isinstance(raw, Mapping):
        raise ValueError(f'{QUOTA_SETTING} must be a JSON object like {{"default": {{"max_jobs": 2}}}}')
    quotas: dict[str, ProjectQuota] = {}
    for name, entry in raw.items():
        if not isinstance(name, str) or name == "*" or not PROJECT_NAME_RE.match(name):
            raise ValueError(f"{QUOTA_SETTING}: {name!r} is not a project name (nor {DEFAULT_QUOTA_KEY!r})")
        if isinstance(entry, ProjectQuota):
            quotas[name] = entry
            continue
        if not isinstance(entry, Mapping):
            raise ValueError(f"{QUOTA_SETTING}: {name} must be an object with {', '.join(QUOTA_KEYS)}")
        unknown = sorted(set(entry) - set(QUOTA_KEYS))
        if unknown:
            raise ValueError(
                f"{QUOTA_SETTING}: {name}.{unknown[0]} is not a quota (use {', '.join(QUOTA_KEYS)})"
            )
        quotas[name] = ProjectQuota(**{k: _limit(name, k, entry.get(k)) for k in QUOTA_KEYS})
    return quotas


def quota_for(quotas: Mapping[str, ProjectQuota], project: str) -> ProjectQuota:
    """A project's own entry, else the default entry, else no limits."""
    return quotas.get(project) or quotas.get(DEFAULT_QUOTA_KEY) or ProjectQuota()


@dataclass(frozen=True)
class JobLoad:
    """What the scheduler knows of a job: its project, order and what it reserves while it runs."""

    id: str
    project: str
    seq: int
    need: Capacity
    workers: int
    priority: int = 0


@dataclass(frozen=True)
class Wait:
    """Why a queued job does not start now: `kind` (capacity | project_quota) and a sentence."""

    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


@dataclass
class Plan:
    """What to start now, in order, and why each other queued job waits."""

    start: list[str] = field(default_factory=list)
    waits: dict[str, Wait] = field(default_factory=dict)


def never_fits(need: Capacity, total: Capacity) -> str | None:
    """Why a job can never run on this cluster (the first resource it needs more of than exists), or None."""
    for name, (plural, asked) in RESOURCE_WORDS.items():
        if need.get(name, 0.0) > total.get(name, 0.0):
            return (
                f"the job needs {need[name]:g} {plural} ({asked}) "
                f"but the cluster has {total.get(name, 0.0):g} in all"
            )
    return None


def exceeds_quota(job: JobLoad, quota: ProjectQuota) -> str | None:
    """Why a job can never run within its project's quota (it alone asks for more), or None."""
    if quota.max_workers is not None and job.workers > quota.max_workers:
        return (f"the job needs {job.workers} workers but project {job.project} may use "
                f"{quota.max_workers} at once ({QUOTA_SETTING})")  # fmt: skip
    gpus = job.need.get("GPU", 0.0)
    if quota.max_gpus is not None and gpus > quota.max_gpus:
        return (f"the job needs {gpus:g} GPUs but project {job.project} may use "
                f"{quota.max_gpus:g} at once ({QUOTA_SETTING})")  # fmt: skip
    return None


def must_wait(need: Capacity, free: Capacity) -> str | None:
    """What a job waits for (the first resource not free enough now), or None."""
    for name, (plural, _asked) in RESOURCE_WORDS.items():
        if need.get(name, 0.0) > free.get(name, 0.0) + 1e-9:
            return f"waiting for {need[name]:g} free {plural} ({free.get(name, 0.0):g} free now)"
    return None


@dataclass
class _Usage:
    jobs: int = 0
    workers: int = 0
    gpus: float = 0.0

    def add(self, job: JobLoad) -> None:
        self.jobs += 1
        self.workers += job.workers
        self.gpus += job.need.get("GPU", 0.0)


def _over_quota(job: JobLoad, quota: ProjectQuota, used: _Usage) -> str | None:
    """What the job waits for in its project's quota, or None when the quota lets it start."""
    if quota.max_jobs is not None and used.jobs >= quota.max_jobs:
        return f"{used.jobs} of {quota.max_jobs} jobs of project {job.project} running"
    if quota.max_workers is not None and used.workers + job.workers > quota.max_workers:
        return (f"needs {job.workers} workers; project {job.project} uses "
                f"{used.workers} of {quota.max_workers}")  # fmt: skip
    gpus = job.need.get("GPU", 0.0)
    if quota.max_gpus is not None and gpus > 0 and used.gpus + gpus > quota.max_gpus + 1e-9:
        return f"needs {gpus:g} GPUs; project {job.project} uses {used.gpus:g} of {quota.max_gpus:g}"
    return None


def plan_dispatch(
    queued: Sequence[JobLoad],
    running: Iterable[JobLoad],
    quotas: Mapping[str, ProjectQuota],
    free: Capacity,
    max_running: int,
) -> Plan:
    """The jobs to start now (in order) and a Wait for every other queued job (see the module docstring).

    `queued` must hold only jobs that can run at all (see `never_fits`, `exceeds_quota`); `free` is
    the cluster's capacity less what the running jobs reserve; `max_running` counts all projects."""
    used: dict[str, _Usage] = {}
    for job in running:
        used.setdefault(job.project, _Usage()).add(job)
    running_now = sum(u.jobs for u in used.values())
    lines: dict[str, list[JobLoad]] = {}
    for job in sorted(queued, key=lambda j: (-j.priority, j.seq)):
        lines.setdefault(job.project, []).append(job)
    free = dict(free)
    plan = Plan()
    held: Wait | None = None  # once set, every job still in line waits with it
    while lines:
        project = min(lines, key=lambda p: (used.get(p, _Usage()).jobs, min(j.seq for j in lines[p])))
        line = lines.pop(project)
        job = line[0]
        usage = used.setdefault(project, _Usage())
        quota = quota_for(quotas, project)
        over = _over_quota(job, quota, usage)
        if over is not None:  # this project waits; the others go on
            plan.waits[job.id] = Wait("project_quota", over)
            for later in line[1:]:  # priority order: none passes the project's first job
                own = _over_quota(later, quota, usage)
                plan.waits[later.id] = Wait("project_quota", own or f"behind {job.id} of the same project")
            continue
        if held is None and running_now >= max_running:
            held = Wait(
                "capacity", f"{running_now} of {max_running} jobs running (MINORDPO_MAX_CONCURRENT_JOBS)"
            )
        if held is not None:
            plan.waits.update((j.id, held) for j in line)
            continue
        short = must_wait(job.need, free)
        if short is not None:  # the cluster's next free resources are this job's
            plan.waits[job.id] = Wait("capacity", short)
            held = Wait("capacity", f"behind {job.id}, which is {short}")
        else:
            plan.start.append(job.id)
            usage.add(job)
            running_now += 1
            for name, amount in job.need.items():
                free[name] = free.get(name, 0.0) - amount
        if line[1:]:
            lines[project] = line[1:]
    return plan

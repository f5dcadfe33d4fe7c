"""Dispatch order and per-project quotas without Ray or a database: who starts, in what order, why others wait."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.scheduling import (
    JobLoad,
    ProjectQuota,
    exceeds_quota,
    parse_project_quotas,
    plan_dispatch,
    quota_for,
)
from core.settings import Settings

CLUSTER = {"CPU": 16.0, "GPU": 0.0}


def job(
    job_id: str, project: str, seq: int, *, priority: int = 0, workers: int = 1, gpus: float = 0.0
) -> JobLoad:
    return JobLoad(job_id, project, seq, {"CPU": float(workers), "GPU": gpus}, workers, priority)


def start_order(queued: list[JobLoad], quotas: dict[str, ProjectQuota], rounds: int) -> list[str]:
    """Run `rounds` passes in which every started job ends before the next pass: the order jobs start in."""
    started: list[str] = []
    for _ in range(rounds):
        waiting = [j for j in queued if j.id not in started]
        plan = plan_dispatch(waiting, [], quotas, CLUSTER, max_running=8)
        started += plan.start
    return started


def test_two_projects_with_a_quota_of_one_take_turns_whatever_the_submission_order() -> None:
    # project a submits four jobs before project b submits its three
    queued = [job(f"a{i}", "a", i) for i in range(4)] + [job(f"b{i}", "b", 10 + i) for i in range(3)]
    quotas = {"default": ProjectQuota(max_jobs=1)}
    plan = plan_dispatch(queued, [], quotas, CLUSTER, max_running=8)
    assert plan.start == ["a0", "b0"]  # one of each, not a0..a3
    assert str(plan.waits["a1"]) == "project_quota: 1 of 1 jobs of project a running"
    assert str(plan.waits["b2"]) == "project_quota: 1 of 1 jobs of project b running"
    assert start_order(queued, quotas, rounds=4) == ["a0", "b0", "a1", "b1", "a2", "b2", "a3"]


def test_without_quotas_the_project_with_fewer_running_jobs_goes_first() -> None:
    queued = [job("a1", "a", 1), job("a2", "a", 2), job("b1", "b", 3)]
    running = [job("a0", "a", 0)]  # a already has a job running
    plan = plan_dispatch(queued, running, {}, CLUSTER, max_running=3)
    assert plan.start == ["b1", "a1"]
    assert str(plan.waits["a2"]) == "capacity: 3 of 3 jobs running (MINORDPO_MAX_CONCURRENT_JOBS)"


def test_priority_orders_within_a_project_and_submission_order_breaks_ties() -> None:
    queued = [
        job("low", "a", 1, priority=-5),
        job("mid-old", "a", 2, priority=3),
        job("high", "a", 3, priority=9),
        job("mid-new", "a", 4, priority=3),
    ]
    order = start_order(queued, {"a": ProjectQuota(max_jobs=1)}, rounds=4)
    assert order == ["high", "mid-old", "mid-new", "low"]


def test_priority_does_not_let_one_project_pass_another() -> None:
    queued = [job("a-low", "a", 1, priority=-100), job("b-high", "b", 2, priority=100)]
    # one slot left in all: the project whose oldest job waited longest goes first, whatever b's priority
    plan = plan_dispatch(queued, [], {}, CLUSTER, max_running=1)
    assert plan.start == ["a-low"]


def test_a_project_at_its_quota_does_not_hold_up_the_others() -> None:
    queued = [job("a1", "a", 1), job("a2", "a", 2), job("b1", "b", 3)]
    running = [job("a0", "a", 0)]
    plan = plan_dispatch(queued, running, {"a": ProjectQuota(max_jobs=1)}, CLUSTER, max_running=8)
    assert plan.start == ["b1"]
    assert plan.waits["a1"].kind == plan.waits["a2"].kind == "project_quota"


def test_gpu_and_worker_quotas_count_the_running_jobs_of_the_project() -> None:
    cluster = {"CPU": 64.0, "GPU": 16.0}
    running = [job("a0", "a", 0, workers=2, gpus=6.0)]
    queued = [job("a1", "a", 1, workers=1, gpus=4.0), job("a2", "a", 2, workers=1, gpus=1.0)]
    plan = plan_dispatch(queued, running, {"a": ProjectQuota(max_gpus=8)}, cluster, max_running=8)
    assert plan.start == []  # a2 would fit the quota but does not pass a1, the project's next job
    assert str(plan.waits["a1"]) == "project_quota: needs 4 GPUs; project a uses 6 of 8"
    assert str(plan.waits["a2"]) == "project_quota: behind a1 of the same project"
    workers = plan_dispatch(queued, running, {"a": ProjectQuota(max_workers=2)}, cluster, max_running=8)
    assert str(workers.waits["a1"]) == "project_quota: needs 1 workers; project a uses 2 of 2"
    assert str(workers.waits["a2"]) == "project_quota: needs 1 workers; project a uses 2 of 2"


def test_the_first_job_short_of_capacity_holds_the_jobs_after_it() -> None:
    queued = [job("big", "a", 1, workers=4), job("small", "b", 2, workers=1)]
    plan = plan_dispatch(queued, [], {}, {"CPU": 2.0, "GPU": 0.0}, max_running=8)
    assert plan.start == []  # small would fit, but big would never get its 4 CPUs
    assert str(plan.waits["big"]) == "capacity: waiting for 4 free CPUs (2 free now)"
    assert str(plan.waits["small"]) == "capacity: behind big, which is waiting for 4 free CPUs (2 free now)"


def test_jobs_started_in_one_pass_use_up_the_free_capacity() -> None:
    queued = [job("a1", "a", 1, workers=2), job("b1", "b", 2, workers=2), job("c1", "c", 3, workers=2)]
    plan = plan_dispatch(queued, [], {}, {"CPU": 5.0, "GPU": 0.0}, max_running=8)
    assert plan.start == ["a1", "b1"]
    assert str(plan.waits["c1"]) == "capacity: waiting for 2 free CPUs (1 free now)"


def test_a_job_larger_than_its_projects_quota_can_never_start() -> None:
    quota = ProjectQuota(max_workers=2, max_gpus=4)
    assert exceeds_quota(job("j", "a", 1, workers=2, gpus=4.0), quota) is None
    assert exceeds_quota(job("j", "a", 1, workers=3), quota) == (
        "the job needs 3 workers but project a may use 2 at once (MINORDPO_PROJECT_QUOTAS)"
    )
    assert exceeds_quota(job("j", "a", 1, workers=2, gpus=6.0), quota) == (
        "the job needs 6 GPUs but project a may use 4 at once (MINORDPO_PROJECT_QUOTAS)"
    )


def test_quotas_parse_from_json_and_unnamed_projects_get_the_default() -> None:
    quotas = parse_project_quotas('{"default": {"max_jobs": 2}, "team-a": {"max_jobs": 4, "max_gpus": 8}}')
    assert quota_for(quotas, "team-a") == ProjectQuota(max_jobs=4, max_gpus=8)
    assert quota_for(quotas, "team-b") == ProjectQuota(max_jobs=2)
    assert quota_for({}, "team-b") == ProjectQuota()
    assert parse_project_quotas("") == {} and parse_project_quotas(None) == {}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ('{"team-a": {"max_job": 4}}', "team-a.max_job is not a quota (use max_jobs, max_workers, max_gpus)"),
        ('{"team-a": {"max_jobs": 0}}', "team-a.max_jobs must be at least 1"),
        ('{"team-a": {"max_jobs": 1.5}}', "team-a.max_jobs must be a whole number or null, not 1.5"),
        ('{"team-a": {"max_workers": true}}', "team-a.max_workers must be a whole number or null, not True"),
        ('{"team-a": {"max_gpus": -1}}', "team-a.max_gpus must be above 0"),
        ('{"team-a": {"max_gpus": "8"}}', "team-a.max_gpus must be a number or null, not '8'"),
        ('{"team a": {"max_jobs": 1}}', "'team a' is not a project name"),
        ('{"team-a": 4}', "team-a must be an object with max_jobs, max_workers, max_gpus"),
        ('[{"max_jobs": 1}]', "must be a JSON object"),
        ('{"team-a": {"max_jobs": 1}', "is not valid JSON"),
    ],
)
def test_a_bad_quota_setting_stops_start_up_naming_the_bad_key(
    raw: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MINORDPO_PROJECT_QUOTAS", raw)
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert "MINORDPO_PROJECT_QUOTAS" in str(caught.value) and message in str(caught.value)


def test_the_quota_setting_reaches_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINORDPO_PROJECT_QUOTAS", '{"default": {"max_jobs": 1}, "big": {"max_gpus": 2.5}}')
    assert Settings().project_quotas == {
        "default": ProjectQuota(max_jobs=1),
        "big": ProjectQuota(max_gpus=2.5),
    }
    assert Settings(project_quotas={"x": {"max_workers": 3}}).project_quotas == {
        "x": ProjectQuota(max_workers=3)
    }

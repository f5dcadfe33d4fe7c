"""Driver-side forwarding rules without Ray: replayed rows dropped, rank mismatches found."""

from __future__ import annotations

from typing import Any

from workers.job_run import _Forwarder
from workers.ray_job import _rank_differences


def _collect(skip: int = 0) -> tuple[_Forwarder, list[Any]]:
    seen: list[Any] = []
    fwd = _Forwarder(
        lambda s, v: seen.append(("m", s, v)),
        lambda k, m, d: seen.append(("e", k)),
        lambda s, p, v: seen.append(("c", s, p)),
        skip_through_step=skip,
    )
    return fwd, seen


def test_rows_replayed_after_a_restart_are_forwarded_once() -> None:
    fwd, seen = _collect()
    for step in [1, 2, 3, 4, 3, 4, 5]:  # restart from the checkpoint at step 2
        fwd({"type": "metrics", "step": step, "values": {"loss": float(step)}})
    fwd({"type": "metrics", "step": 4, "values": {"eval/loss": 1.0}})
    fwd({"type": "metrics", "step": 4, "values": {"eval/loss": 1.0}})
    fwd({"type": "checkpoint", "step": 2, "path": "a", "values": {}})
    fwd({"type": "checkpoint", "step": 2, "path": "b", "values": {}})
    fwd({"type": "event", "kind": "resumed", "message": "m", "data": {}})
    assert [s for k, s, *_ in seen if k == "m"] == [1, 2, 3, 4, 5, 4]
    assert [x for x in seen if x[0] == "c"] == [("c", 2, "a")]
    assert ("e", "resumed") in seen and fwd.latest_checkpoint == "a" and fwd.max_step == 5


def test_a_restarted_driver_skips_steps_its_store_holds() -> None:
    fwd, seen = _collect(skip=3)
    for step in [3, 4]:
        fwd({"type": "metrics", "step": step, "values": {"loss": 0.5}})
    assert [s for k, s, *_ in seen if k == "m"] == [4]


def test_the_runs_closing_event_comes_after_its_last_checkpoint() -> None:
    fwd, seen = _collect()
    fwd({"type": "metrics", "step": 3, "values": {"loss": 0.5}})
    # rank 0 puts its events straight into the channel; the checkpoint it saved on stopping comes through
    # Ray Train's controller, later
    fwd({"type": "event", "kind": "cancelled", "message": "training cancelled at step 3", "data": {}})
    fwd({"type": "checkpoint", "step": 3, "path": "c3", "values": {}})
    assert ("e", "cancelled") not in seen
    fwd.finish()
    assert seen == [("m", 3, {"loss": 0.5}), ("c", 3, "c3"), ("e", "cancelled")]
    fwd.finish()
    assert seen.count(("e", "cancelled")) == 1


def test_eval_generations_go_to_their_own_callable_and_do_not_count_as_steps() -> None:
    seen: list[Any] = []
    fwd = _Forwarder(
        lambda s, v: seen.append(("m", s)),
        lambda k, m, d: seen.append(("e", k)),
        lambda s, p, v: seen.append(("c", s)),
        on_generations=lambda s, samples: seen.append(("g", s, samples)),
    )
    samples = [{"index": 0, "prompt": "p", "chosen": "c", "completion": "x"}]
    fwd({"type": "generations", "step": 7, "samples": samples})
    assert seen == [("g", 7, samples)] and fwd.max_step == 0
    silent, quiet = _collect()
    silent({"type": "generations", "step": 7, "samples": samples})  # a driver that stores none
    assert quiet == [] and silent.max_step == 0  # dropped: not a metric, an event or a step


def test_rank_differences_ignore_per_rank_timings() -> None:
    same = {"loss": 0.5, "step": 1}
    assert _rank_differences([{**same, "step_time": 1.0}, {**same, "step_time": 2.0}]) == []
    assert _rank_differences([same, {**same, "loss": 0.6}]) == ["loss"]
    assert _rank_differences([same]) == []

"""Events (per-job seq, dedup, concurrent appends) and metrics (idempotent appends, series, downsampling)."""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import event, text

from core.store import (
    Database,
    NotFoundError,
    add_checkpoint,
    append_event,
    append_metrics,
    create_job,
    last_event_seq,
    list_events,
    metric_series,
    require_job,
    transition,
)
from core.store.metrics import MetricPoint


def new_job(db: Database) -> str:
    with db.write() as s:
        job, _ = create_job(s, project="p", spec={"name": "m"})
        return job.id


def test_event_seq_increases_per_job_and_dedup_returns_the_first(db: Database) -> None:
    a, b = new_job(db), new_job(db)
    with db.write() as s:
        e1, c1 = append_event(s, a, "warning", "slow step", {"step": 3})
        e2, c2 = append_event(s, a, "checkpoint", "ckpt 100", dedup_key="checkpoint:100")
        e3, c3 = append_event(s, a, "checkpoint", "ckpt 100 again", dedup_key="checkpoint:100")
        eb, _ = append_event(s, b, "warning", "other job")
    assert (e1.seq, e2.seq) == (2, 3) and c1 and c2  # seq 1 is the "queued" status event
    assert not c3 and e3.seq == e2.seq and e3.message == "ckpt 100"
    assert eb.seq == 2
    with db.read() as s:
        assert [e.seq for e in list_events(s, a)] == [1, 2, 3]
        assert [e.seq for e in list_events(s, a, after_seq=1, limit=1)] == [2]
        assert last_event_seq(s, a) == 3
    with db.write() as s, pytest.raises(NotFoundError):
        append_event(s, "job_missing", "warning")


def test_concurrent_event_appends_get_unique_gapless_seqs(db: Database) -> None:
    job_id = new_job(db)
    start = threading.Barrier(8)

    def writer(w: int) -> None:
        start.wait(10)
        for i in range(10):
            with db.write() as s:
                append_event(s, job_id, "log", f"{w}:{i}")
            with db.write() as s:  # a retried report: deduplicated
                append_event(s, job_id, "log", f"{w}:{i}", dedup_key=f"log:{w}:{i % 5}")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(writer, range(8)))
    with db.read() as s:
        events = list_events(s, job_id, limit=1000)
    seqs = [e.seq for e in events]
    assert seqs == sorted(set(seqs))
    assert len([e for e in events if e.dedup_key and e.dedup_key.startswith("log:")]) == 8 * 5
    assert len([e for e in events if e.kind == "log" and e.dedup_key is None]) == 80


def test_a_finished_job_records_nothing_after_its_terminal_status(db: Database) -> None:
    job_id = new_job(db)
    with db.write() as s:
        transition(s, job_id, "running")
        add_checkpoint(s, job_id, 2, "/ckpt/2")
        transition(s, job_id, "cancelled")
    with db.write() as s:  # a late writer: the run's last checkpoint and its closing event
        add_checkpoint(s, job_id, 3, "/ckpt/3")
        late, created = append_event(s, job_id, "cancelled", "training cancelled at step 3")
        assert late is None and not created
        assert append_event(s, job_id, "status", "preparing data and model") == (None, False)
        assert not transition(s, job_id, "failed")
    with db.write() as s:  # a webhook's delivery outcome is still recorded
        _, delivered = append_event(s, job_id, "webhook", "job.cancelled delivered", dedup_key="webhook:1:ok")
    with db.read() as s:
        events = list_events(s, job_id)
    kinds = [(e.kind, (e.data or {}).get("to")) for e in events]
    assert kinds == [
        ("status", "queued"),
        ("status", "running"),
        ("checkpoint", None),
        ("status", "cancelled"),
        ("webhook", None),
    ]
    assert delivered and [e.seq for e in events] == sorted({e.seq for e in events})
    with db.write() as s, pytest.raises(NotFoundError):
        append_event(s, "job_missing", "checkpoint")


def test_a_succeeded_job_has_exactly_one_final_model_event(db: Database) -> None:
    job_id = new_job(db)
    with db.write() as s:
        transition(s, job_id, "running")
        # the loop's own event (forwarded by the driver), then the driver's record of the outcome
        first, created = append_event(s, job_id, "final_model", "final model saved", {"path": "/out/final"})
        again, again_created = append_event(
            s,
            job_id,
            "final_model",
            "final model at /out/final",
            {"path": "/out/final"},
            dedup_key="final_model",
        )
        transition(s, job_id, "succeeded")
    assert created and not again_created and first is not None and again is not None
    assert again.seq == first.seq
    with db.read() as s:
        finals = [e for e in list_events(s, job_id) if e.kind == "final_model"]
    assert len(finals) == 1 and finals[0].data == {"path": "/out/final"}


def test_metric_append_is_idempotent_and_merges_new_names(db: Database) -> None:
    job_id = new_job(db)
    rows = [{"step": s, "time": 1000.0 + s, "values": {"loss": 1.0 / (s + 1)}} for s in range(1, 11)]
    with db.write() as s:
        assert append_metrics(s, job_id, rows) == 10
    with db.write() as s:  # a retried worker re-reports every step
        assert append_metrics(s, job_id, rows) == 0
        assert append_metrics(s, job_id, [{"step": 5, "values": {"loss": 99.0}}]) == 0  # first value wins
        # an eval at an existing step adds its names; the flat row form is accepted too
        assert append_metrics(s, job_id, [{"step": 10, "time": 2000.0, "eval_loss": 0.5}]) == 1
    with db.read() as s:
        series = metric_series(s, job_id)
        assert [r.step for r in series.data] == list(range(1, 11)) and not series.has_more
        assert series.data[4].values == {"loss": 1.0 / 6}
        assert series.data[-1].as_dict() == {"step": 10, "time": 1010.0, "loss": 1.0 / 11, "eval_loss": 0.5}
        assert s.query(MetricPoint).filter_by(job_id=job_id).count() == 10
        job = require_job(s, job_id)
        assert job.step == 10 and job.latest_metrics == {"loss": 1.0 / 11, "eval_loss": 0.5}


def test_metric_values_are_validated_and_non_finite_become_null(db: Database) -> None:
    job_id = new_job(db)
    with db.write() as s:
        append_metrics(s, job_id, [{"step": 1, "values": {"loss": math.nan, "grad_norm": math.inf, "lr": 1}}])
        with pytest.raises(ValueError):
            append_metrics(s, job_id, [{"step": 2, "values": {"bad name!": 1.0}}])
        with pytest.raises(ValueError):
            append_metrics(s, job_id, [{"step": 2, "values": {"loss": "high"}}])
        with pytest.raises(ValueError):
            append_metrics(s, job_id, [{"step": -1, "values": {"loss": 1.0}}])
        with pytest.raises(NotFoundError):
            append_metrics(s, "job_missing", [{"step": 1, "values": {"loss": 1.0}}])
    with db.read() as s:
        (row,) = metric_series(s, job_id).data
    assert row.values == {"loss": None, "grad_norm": None, "lr": 1.0}


def test_series_names_after_step_and_limit(db: Database) -> None:
    job_id = new_job(db)
    rows = [
        {
            "step": s,
            "time": float(s),
            "values": {"loss": float(s), **({"eval_loss": s / 10} if s % 50 == 0 else {})},
        }
        for s in range(1, 301)
    ]
    with db.write() as s:
        append_metrics(s, job_id, rows)
    with db.read() as s:
        evals = metric_series(s, job_id, names=["eval_loss"])
        assert [r.step for r in evals.data] == [50, 100, 150, 200, 250, 300]
        assert all(set(r.values) == {"eval_loss"} for r in evals.data)
        both = metric_series(s, job_id, names=["eval_loss", "loss"], after_step=290)
        assert [r.step for r in both.data] == list(range(291, 301))
        assert metric_series(s, job_id, names=["missing"]).data == []
        page = metric_series(s, job_id, after_step=100, limit=20)
        assert [r.step for r in page.data] == list(range(101, 121)) and page.has_more
        assert page.next_after_step == 120
        rest = metric_series(s, job_id, after_step=page.next_after_step, limit=1000)
        assert rest.data[0].step == 121 and not rest.has_more and rest.next_after_step == 300
        empty = metric_series(s, job_id, after_step=300)
        assert empty.data == [] and empty.next_after_step == 300
        evals_down = metric_series(s, job_id, names=["eval_loss"], max_points=3)
        assert [r.step for r in evals_down.data] == [50, 150, 300]
        with pytest.raises(ValueError):
            metric_series(s, job_id, names=["no spaces"])
        with pytest.raises(ValueError):
            metric_series(s, job_id, max_points=1)


def _expected_ranks(n: int, m: int) -> list[int]:
    if n <= m:
        return list(range(n))
    return sorted({k * (n - 1) // (m - 1) for k in range(m)})


@pytest.mark.parametrize("stride", [1, 3])  # consecutive steps (fast path) and steps with gaps (by rank)
@pytest.mark.parametrize("n,m", [(1, 5), (5, 5), (6, 5), (7, 2), (10, 3), (101, 10), (997, 50)])
def test_downsampling_picks_exactly_m_evenly_spaced_points(db: Database, n: int, m: int, stride: int) -> None:
    job_id = new_job(db)
    steps = [stride * i + 1 for i in range(n)]
    with db.write() as s:
        append_metrics(
            s, job_id, [{"step": st, "time": 0.0, "values": {"x": st}} for st in steps], update_job=False
        )
    with db.read() as s:
        got = [r.step for r in metric_series(s, job_id, max_points=m).data]
    assert got == [steps[r] for r in _expected_ranks(n, m)]
    assert len(got) == min(n, m) and got[0] == steps[0] and got[-1] == steps[-1]


def test_downsampling_100k_points_to_500_is_fast(db: Database) -> None:
    job_id = new_job(db)
    n = 100_000
    with db.write() as s:
        append_metrics(
            s,
            job_id,
            ({"step": st, "time": float(st), "values": {"loss": 1.0, "lr": 0.1}} for st in range(n)),
        )
    with db.read() as s:
        started = time.perf_counter()
        series = metric_series(s, job_id, max_points=500)
        elapsed = time.perf_counter() - started
        named = metric_series(s, job_id, max_points=500, names=["lr"])
    steps = [r.step for r in series.data]
    assert len(steps) == 500 and steps[0] == 0 and steps[-1] == n - 1
    gaps = {b - a for a, b in zip(steps, steps[1:], strict=False)}
    assert gaps <= {200, 201}, gaps
    assert [r.step for r in named.data] == steps and set(named.data[0].values) == {"lr"}
    assert elapsed < 2.5, f"downsampling 100k points took {elapsed:.2f}s"


def _metric_rows(db: Database, job_id: str) -> int:
    with db.read() as s:
        return int(
            s.execute(text("SELECT metric_rows FROM jobs WHERE id = :id"), {"id": job_id}).scalar_one()
        )


def test_the_job_counts_its_metric_rows_once_each(db: Database) -> None:
    job_id = new_job(db)
    with db.write() as s:
        append_metrics(s, job_id, [{"step": st, "values": {"loss": 1.0}} for st in (1, 2, 3)])
    with db.write() as s:  # a retried report: two steps again (one gains a name), one new
        append_metrics(
            s, job_id, [{"step": 2, "values": {"loss": 9.0, "lr": 0.1}}, {"step": 3, "values": {}}]
        )
        append_metrics(s, job_id, [{"step": 7, "values": {"loss": 0.5}}], update_job=False)
    assert _metric_rows(db, job_id) == 4


@pytest.mark.parametrize("stride", [1, 3])
def test_the_count_spares_a_scan_only_where_it_proves_the_steps_have_no_gaps(
    db: Database, stride: int
) -> None:
    job_id = new_job(db)
    steps = [stride * i + 1 for i in range(300)]
    with db.write() as s:
        append_metrics(s, job_id, [{"step": st, "time": 0.0, "values": {"x": st}} for st in steps])
    statements: list[str] = []

    def record(conn, cursor, statement, *args) -> None:  # noqa: ANN001 - SQLAlchemy's event signature
        statements.append(statement)

    event.listen(db.engine, "before_cursor_execute", record)
    try:
        with db.read() as s:
            got = [r.step for r in metric_series(s, job_id, max_points=20).data]
            after = [r.step for r in metric_series(s, job_id, max_points=20, after_step=100).data]
    finally:
        event.remove(db.engine, "before_cursor_execute", record)
    assert got == [steps[r] for r in _expected_ranks(300, 20)]
    later = [st for st in steps if st > 100]
    assert after == [later[r] for r in _expected_ranks(len(later), 20)]
    counted = [sql for sql in statements if sql.lower().startswith("select count(*)")]
    # the whole series of gapless steps needs no count; gaps, or a range after a step, still count
    assert len(counted) == (1 if stride == 1 else 2), statements


def test_rows_that_another_writer_left_uncounted_fall_back_to_counting(db: Database) -> None:
    job_id = new_job(db)
    with db.write() as s:
        append_metrics(s, job_id, [{"step": st, "time": 0.0, "values": {"x": st}} for st in range(1, 101)])
        # steps 101..150 inserted by something that keeps no count (an older driver during an upgrade)
        s.add_all(
            MetricPoint(job_id=job_id, step=st, wall_time=0.0, metrics={"x": st}) for st in range(101, 151)
        )
    assert _metric_rows(db, job_id) == 100
    with db.read() as s:
        got = [r.step for r in metric_series(s, job_id, max_points=11).data]
    assert got == [1 + r for r in _expected_ranks(150, 11)]


def test_eval_generations_keep_the_first_and_latest_steps(db: Database) -> None:
    from core.spec import MAX_GENERATION_STEPS
    from core.store import add_generations
    from core.store.generations import generation_steps, get_generations

    job_id = new_job(db)
    last = MAX_GENERATION_STEPS + 7
    for step in range(1, last + 1):
        with db.write() as s:
            assert add_generations(s, job_id, step, [{"prompt": "p", "chosen": "c", "completion": str(step)}])
    with db.write() as s:
        assert not add_generations(s, job_id, 4, [])  # trimmed already: not stored again
        assert not add_generations(s, job_id, last, [{"prompt": "p", "chosen": "c", "completion": "retry"}])
        assert get_generations(s, job_id, last).samples[0]["completion"] == str(last)  # its first samples
    with db.read() as s:
        assert generation_steps(s, job_id) == [1, *range(last - MAX_GENERATION_STEPS + 2, last + 1)]

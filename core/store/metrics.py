"""Metric points: idempotent appends and step-range series with SQL downsampling.

Layout: one row per (job_id, step) holding every metric of that step as a JSON object (JSONB on
PostgreSQL), primary key (job_id, step). Training reports all metrics of a step together and the
API serves rows `{step, time, <name>: value, ...}`, so a step range is one primary-key range scan
with no pivot, and 100k steps are 100k rows (a row per (step, name) would be 10x as many for ten
metrics, and downsampling would have to window over all of them). A name filter keeps the rows
holding any of the names (`?|` on JSONB, `json_type` on SQLite). Downsampling numbers the matching
rows by step with `row_number()` and keeps the ranks nearest to `max_points` evenly spaced ones,
first and last always included, computed in SQL from the step column alone before the JSON is read.

A step reported again (a retried worker) adds only the names the row lacks: the first value of a
name at a step wins, so a retry never duplicates or rewrites a point.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Text, bindparam, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from core.store.errors import NotFoundError
from core.store.models import Job, MetricPoint, utcnow
from core.store.point_reads import json_loads

METRIC_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./:-]{0,127}$")
MAX_LIMIT = 100_000
_INSERT_BATCH = 5000
_INSERT_SQL = {
    "postgresql": """
        INSERT INTO metric_points (job_id, step, wall_time, metrics)
        SELECT :job_id, (e->>0)::integer, (e->>1)::double precision, e->2
        FROM jsonb_array_elements(CAST(:rows AS jsonb)) AS e
        ON CONFLICT (job_id, step) DO NOTHING RETURNING step
    """,
    "sqlite": """
        INSERT INTO metric_points (job_id, step, wall_time, metrics)
        SELECT :job_id, json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]')
        FROM json_each(:rows) WHERE true
        ON CONFLICT (job_id, step) DO NOTHING RETURNING step
    """,
}


@dataclass(frozen=True)
class MetricRow:
    """One step of a series: wall-clock time (unix seconds) and the metric values (None for NaN/inf)."""

    step: int
    time: float
    values: dict[str, float | None]

    def as_dict(self) -> dict[str, Any]:
        """The API's row shape: ``{"step", "time", <name>: value, ...}``."""
        return {"step": self.step, "time": self.time, **self.values}


@dataclass(frozen=True)
class MetricSeries:
    """A page of a series: rows by step; pass `next_after_step` back as `after_step` to continue."""

    data: list[MetricRow]
    next_after_step: int | None
    has_more: bool


def check_metric_name(name: str) -> str:
    """Return `name` if it is a valid metric name (letters, digits, `_./:-`, up to 128), else ValueError."""
    if not isinstance(name, str) or not METRIC_NAME_RE.match(name):
        raise ValueError(f"invalid metric name {name!r}")
    return name


def _clean_value(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"metric {name!r} must be a number, got {type(value).__name__}")
    number = float(value)
    return number if math.isfinite(number) else None


def _clean_rows(rows: Iterable[Mapping[str, Any]]) -> dict[int, tuple[float, dict[str, float | None]]]:
    out: dict[int, tuple[float, dict[str, float | None]]] = {}
    checked: set[str] = set()
    for row in rows:
        step = row.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"metric row needs a non-negative integer step, got {step!r}")
        raw_time = row.get("time")
        wall = float(raw_time) if raw_time is not None else time.time()
        raw = (
            row["values"] if "values" in row else {k: v for k, v in row.items() if k not in ("step", "time")}
        )
        for name in raw.keys() - checked:
            checked.add(check_metric_name(name))
        values = {k: _clean_value(k, v) for k, v in raw.items()}
        if step in out:  # the same step twice in one batch: first value of each name wins
            prev_time, prev = out[step]
            out[step] = (prev_time, {**values, **prev})
        else:
            out[step] = (wall, values)
    return out


def append_metrics(
    session: Session, job_id: str, rows: Iterable[Mapping[str, Any]], *, update_job: bool = True
) -> int:
    """Store metric rows ``{"step": int, "time": float?, "values": {name: number}}`` idempotently.

    The flat form ``{"step", "time", <name>: value}`` is accepted too. NaN/inf are stored as null.
    A (job, step) already stored only gains the names it lacked (first value wins). With
    `update_job`, the job's progress `step` and `latest_metrics` follow the highest step. The job's
    `metric_rows` counts the rows inserted, always (`metric_series` relies on it). Returns
    how many rows were inserted or gained names. Raises NotFoundError, ValueError.
    """
    cleaned = _clean_rows(rows)
    if not cleaned:
        return 0
    job = session.execute(
        select(Job.step, Job.latest_metrics).where(Job.id == job_id).with_for_update()
    ).one_or_none()
    if job is None:
        raise NotFoundError(f"job {job_id} not found")
    ordered = sorted(cleaned.items())
    sql = text(_INSERT_SQL[session.get_bind().dialect.name])
    inserted: set[int] = set()
    # One statement per batch with the rows as a single JSON array parameter: a multi-row VALUES
    # list costs the drivers (psycopg query splitting) more than the database spends inserting.
    for start in range(0, len(ordered), _INSERT_BATCH):
        payload = json.dumps(
            [[st, t, v] for st, (t, v) in ordered[start : start + _INSERT_BATCH]], allow_nan=False
        )
        inserted.update(session.execute(sql, {"job_id": job_id, "rows": payload}).scalars().all())
    written = len(inserted)
    job_values: dict[str, Any] = {"metric_rows": Job.metric_rows + len(inserted)} if inserted else {}
    repeats = [s for s in cleaned if s not in inserted]
    if repeats:
        stored = session.execute(
            select(MetricPoint.step, MetricPoint.metrics).where(
                MetricPoint.job_id == job_id, MetricPoint.step.in_(repeats)
            )
        ).all()
        for step, old in stored:
            new = cleaned[step][1]
            if set(new) - set(old):
                session.execute(
                    update(MetricPoint)
                    .where(MetricPoint.job_id == job_id, MetricPoint.step == step)
                    .values(metrics={**new, **old})
                    .execution_options(synchronize_session=False)
                )
                written += 1
    if update_job:
        top = max(cleaned)
        if top >= job.step:
            latest = dict(job.latest_metrics or {})
            for step in sorted(s for s in cleaned if s >= job.step):
                latest.update(cleaned[step][1])
            now = utcnow()
            job_values.update(step=top, latest_metrics=latest, heartbeat_at=now, updated_at=now)
    if job_values:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(**job_values)
            .execution_options(synchronize_session="fetch")
        )
    session.flush()
    return written


def _names_filter(dialect: str, names: Sequence[str], params: dict[str, Any]) -> str:
    if dialect == "postgresql":
        params["names"] = list(names)
        return "AND metrics ?| :names"
    clauses = []
    for i, name in enumerate(names):
        params[f"n{i}"] = f'$."{name}"'
        clauses.append(f"json_type(metrics, :n{i}) IS NOT NULL")
    return "AND (" + " OR ".join(clauses) + ")"


def _range_stats(session: Session, where: str, params: dict[str, Any]) -> tuple[int, int, int]:
    """Row count and first/last step of the selected range (one index range scan)."""
    stats = {k: v for k, v in params.items() if k != "lim"}
    query = text(f"SELECT count(*), min(step), max(step) FROM metric_points WHERE {where}")
    if "names" in stats:
        query = query.bindparams(bindparam("names", type_=ARRAY(Text())))
    n, first, last = session.execute(query, stats).one()
    return int(n), int(first or 0), int(last or 0)


_WHOLE_RANGE = text(
    "SELECT metric_rows,"
    " (SELECT step FROM metric_points WHERE job_id = :job_id ORDER BY step ASC LIMIT 1),"
    " (SELECT step FROM metric_points WHERE job_id = :job_id ORDER BY step DESC LIMIT 1)"
    " FROM jobs WHERE id = :job_id"
)


def _whole_range_stats(session: Session, job_id: str) -> tuple[int, int, int] | None:
    """`_range_stats` of a job's whole series when its stored count proves the steps have no gaps.

    Two index lookups and the job's `metric_rows` instead of counting every row. The rows' steps are
    distinct, so there are at most last - first + 1 of them, and at least `metric_rows` (every insert
    counted; nothing deletes rows of a job that exists): equal bounds prove n = last - first + 1.
    None otherwise (gaps, or rows that some other writer inserted uncounted).
    """
    counted, first, last = session.execute(_WHOLE_RANGE, {"job_id": job_id}).one_or_none() or (0, None, None)
    if first is None or counted != last - first + 1:
        return None
    return int(counted), int(first), int(last)


def metric_series(
    session: Session,
    job_id: str,
    *,
    after_step: int | None = None,
    names: Sequence[str] | None = None,
    max_points: int | None = None,
    limit: int = 10_000,
) -> MetricSeries:
    """Rows of a job's series with step > `after_step`, sorted by step, at most `limit`.

    `names` keeps only those metrics (and only rows holding at least one of them). `max_points`
    downsamples the whole range after `after_step` to that many rows, evenly spaced by rank, the
    first and last always kept (>= 2). Does not check the job exists (no rows for an unknown job).
    """
    limit = max(1, min(int(limit), MAX_LIMIT))
    if max_points is not None and max_points < 2:
        raise ValueError("max_points must be at least 2")
    wanted = [check_metric_name(n) for n in names] if names else None
    dialect = session.get_bind().dialect.name
    params: dict[str, Any] = {
        "job_id": job_id,
        "after": -1 if after_step is None else after_step,
        "lim": limit + 1,
    }
    names_sql = " " + _names_filter(dialect, wanted, params) if wanted else ""
    where = "job_id = :job_id AND step > :after" + names_sql
    plain = f"SELECT step, wall_time, metrics FROM metric_points WHERE {where} ORDER BY step LIMIT :lim"
    picked_steps: list[int] | None = None
    if max_points is not None:
        whole_range = params["after"] < 0 and not wanted  # steps are >= 0
        whole = _whole_range_stats(session, job_id) if whole_range else None
        n, first, last = whole or _range_stats(session, where, params)
        if n <= max_points:
            max_points = None  # nothing to drop
        elif last - first + 1 == n:  # steps without gaps (the usual case): rank r is step first + r
            m = max_points
            picked_steps = sorted({first + k * (n - 1) // (m - 1) for k in range(m)})
    if max_points is None:
        sql = plain
    elif picked_steps is not None:
        # Primary-key lookups only: the picked steps all lie in the range, and with `step > :after` as
        # well SQLite scans the whole range instead.
        sql = (
            "SELECT step, wall_time, metrics FROM metric_points "
            f"WHERE job_id = :job_id AND step IN :steps{names_sql} ORDER BY step LIMIT :lim"
        )
        params["steps"] = picked_steps
    else:
        params["m"] = max_points
        # Rank rn (0-based) of n > m rows is kept when rn == floor(k*(n-1)/(m-1)) for some k in
        # 0..m-1, i.e. when a multiple of (n-1) lies in [rn*(m-1), rn*(m-1) + m - 2] (integer
        # arithmetic only): exactly m distinct ranks, 0 and n-1 among them.
        sql = f"""
            WITH ranked AS (
                SELECT step, row_number() OVER (ORDER BY step) - 1 AS rn, count(*) OVER () AS n
                FROM metric_points WHERE {where}
            ), picked AS (
                SELECT step FROM ranked
                WHERE n <= :m OR ((rn * (:m - 1) + n - 2) / (n - 1)) * (n - 1) <= rn * (:m - 1) + :m - 2
            )
            SELECT mp.step, mp.wall_time, mp.metrics FROM metric_points mp
            JOIN picked ON mp.step = picked.step
            WHERE mp.job_id = :job_id ORDER BY mp.step LIMIT :lim
        """
    query = text(sql)
    if "steps" in params:
        query = query.bindparams(bindparam("steps", expanding=True))
    if "names" in params:
        query = query.bindparams(bindparam("names", type_=ARRAY(Text())))
    result = session.execute(query, params).all()
    more = len(result) > limit
    rows: list[MetricRow] = []
    decimal_json = dialect == "postgresql"  # jsonb gives 3e19 back as the integer 30000000000000000000
    for step, wall, metrics in result[:limit]:
        values = metrics if isinstance(metrics, dict) else json_loads(metrics)
        if wanted:
            values = {k: values[k] for k in wanted if k in values}
        if decimal_json:  # every value was stored as a float (or null): give floats back
            values = {k: float(v) if type(v) is int else v for k, v in values.items()}
        rows.append(MetricRow(step=int(step), time=float(wall), values=values))
    next_after = rows[-1].step if rows else after_step
    return MetricSeries(data=rows, next_after_step=next_after, has_more=more)

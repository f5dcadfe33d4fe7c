"""`minordpo sweep SPEC --grid KEY=V1,V2 ...`: submit a grid of jobs as one group, compare them, summarise."""

from __future__ import annotations

import copy
import itertools
import re
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.connection import DEFAULT, TokenOption, UrlOption, connected
from cli.jobs import SUMMARY_METRICS, SetOption, load_spec_dict, upload_local_data
from cli.output import err, number, out
from cli.specfile import SpecFileError, parse_value, set_path
from core.schemas import JobOut
from core.spec import JobSpec
from minordpo_client import Client, ClientError
from minordpo_client.client import TERMINAL


def parse_grid(items: list[str]) -> list[tuple[str, list[Any]]]:
    """`loss.type=sigmoid,minor_dpo` -> ("loss.type", ["sigmoid", "minor_dpo"]); values parsed as YAML scalars."""
    grid = []
    for item in items:
        key, sep, raw = item.partition("=")
        values = [v.strip() for v in raw.split(",") if v.strip()]
        if not sep or not key or not values:
            raise SpecFileError(f"--grid {item!r} is not KEY=V1,V2,...")
        grid.append((key.strip(), [parse_value(v) for v in values]))
    return grid


def expand(
    base: dict[str, Any], grid: list[tuple[str, list[Any]]]
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Every combination of the grid as (spec, {key: value}), in the order the grid was given."""
    keys = [k for k, _ in grid]
    combos = []
    for values in itertools.product(*(vals for _, vals in grid)):
        chosen = dict(zip(keys, values, strict=True))
        spec = copy.deepcopy(base)
        for key, value in chosen.items():
            set_path(spec, key, value)
        combos.append((spec, chosen))
    return combos


def job_name(base: str, chosen: dict[str, Any]) -> str:
    """`hh-minordpo type=sigmoid learning_rate=1e-05` reduced to the characters a job name allows."""
    parts = [f"{k.rsplit('.', 1)[-1]} {v}" for k, v in chosen.items()]
    name = re.sub(r"[^A-Za-z0-9._ -]", "_", " ".join([base, *parts]))
    return name[:128]


def new_group(name: str) -> str:
    """A readable, unique group id: `<name>-<UTC time>-<random>` (at most 40 characters)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:16] or "sweep"
    return f"{slug}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def wait_all(client: Client, jobs: list[JobOut], poll_s: float = 2.0) -> list[JobOut]:
    """One progress bar per job, polled until every job ends; returns the final jobs in order."""
    final: dict[str, JobOut] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} {task.fields[status]}"),
        TimeElapsedColumn(),
        console=err,
    ) as progress:
        tasks = {j.id: progress.add_task(j.name, total=j.progress.total_steps, status=j.status) for j in jobs}
        while len(final) < len(jobs):
            group = jobs[0].group
            current = {j.id: j for j in client.iter_jobs(group=group)} if group else {}
            for job in jobs:
                if job.id in final:
                    continue
                now = current.get(job.id) or client.get_job(job.id)
                progress.update(
                    tasks[job.id],
                    completed=now.progress.step,
                    total=now.progress.total_steps,
                    status=now.status,
                )
                if now.status in TERMINAL:
                    final[job.id] = now
            if len(final) < len(jobs):
                time.sleep(poll_s)
    return [final[j.id] for j in jobs]


def summary_table(jobs: list[JobOut], grid_keys: list[str], chosen: list[dict[str, Any]]) -> Table:
    """Final metrics per job, with the grid values that distinguish them."""
    table = Table("job", *grid_keys, "status", "step", *SUMMARY_METRICS)
    for job, values in zip(jobs, chosen, strict=True):
        metrics = job.metrics or {}
        cells = [number(metrics.get(m)) for m in SUMMARY_METRICS]
        table.add_row(
            job.id, *(str(values[k]) for k in grid_keys), job.status, str(job.progress.step), *cells
        )
    return table


def register(app: typer.Typer) -> None:
    @app.command("sweep")
    def sweep_cmd(
        spec_file: Annotated[Path, typer.Argument(help="Base job spec (JSON or YAML)")],
        grid: Annotated[
            list[str], typer.Option("--grid", help="KEY=V1,V2,... (repeat; every combination is submitted)")
        ],
        overrides: SetOption = None,
        group: Annotated[
            str | None,
            typer.Option(help="Group id (default: generated); reuse it to resubmit without duplicates"),
        ] = None,
        wait: Annotated[
            bool, typer.Option("--wait", help="Wait for every job, then print a summary table")
        ] = False,
        upload: Annotated[bool, typer.Option("--upload", help="Upload local dataset files first")] = False,
        url: UrlOption = DEFAULT,
        token: TokenOption = None,
    ) -> None:
        """Submit the grid as one group; prints the dashboard's compare link (and, with --wait, a summary)."""
        with connected(url, token) as client:
            base = load_spec_dict(spec_file, overrides)
            axes = parse_grid(grid)
            group_id = group or new_group(str(base.get("name", "sweep")))
            if upload:
                upload_local_data(client, base)
            combos = expand(base, axes)
            for spec, chosen in combos:  # every combination is checked before the first is submitted
                spec.update(name=job_name(str(base.get("name", "sweep")), chosen), group=group_id)
                JobSpec.model_validate(spec)
            jobs = []
            for index, (spec, _chosen) in enumerate(combos):
                try:
                    jobs.append(client.create_job(spec, idempotency_key=f"sweep:{group_id}:{index}"))
                except ClientError:
                    err.print(
                        f"submitted {len(jobs)} of {len(combos)} jobs of group {group_id}; "
                        f"rerun with --group {group_id} to finish (queued jobs are not duplicated)",
                        highlight=False,
                        markup=False,
                    )
                    raise
                err.print(f"queued {jobs[-1].id} {jobs[-1].name}", highlight=False, markup=False)
            out.print(f"group {group_id}: {len(jobs)} jobs", highlight=False, markup=False)
            out.print(
                f"compare: {client.url}/#/compare?group={group_id}",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
            if not wait:
                return
            final = wait_all(client, jobs)
        out.print(summary_table(final, [k for k, _ in axes], [c for _, c in combos]))
        if any(j.status != "succeeded" for j in final):
            raise typer.Exit(1)

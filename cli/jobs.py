"""Remote job commands: submit, list, status, cancel, events, metrics (through minordpo_client)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from cli.connection import DEFAULT, TokenOption, UrlOption, connected
from cli.dry_run import validation_lines
from cli.output import err, number, out
from cli.specfile import apply_overrides, read_spec_dict
from cli.watch import follow, report_end
from core.schemas import JobOut
from minordpo_client import Client

SetOption = Annotated[
    list[str] | None, typer.Option("--set", help="Override a spec field: --set training.learning_rate=1e-5")
]
SUMMARY_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen")


def load_spec_dict(path: Path, overrides: list[str] | None) -> dict[str, Any]:
    """The spec file as a mapping with `--set` overrides applied (validated by the client before sending)."""
    return apply_overrides(read_spec_dict(path), overrides or [])


def upload_local_data(client: Client, spec: dict[str, Any]) -> None:
    """Replace dataset.train/eval paths that are files on this machine by the ids of their uploads."""
    dataset = spec.get("dataset")
    if not isinstance(dataset, dict):
        return
    for field in ("train", "eval"):
        value = dataset.get(field)
        if isinstance(value, str) and Path(value).is_file():
            uploaded = client.upload_dataset(value)
            err.print(
                f"uploaded {value} as {uploaded.id} ({uploaded.report.rows_valid if uploaded.report else '?'} rows)",
                highlight=False,
                markup=False,
            )
            dataset[field] = uploaded.id


def _metric(job: JobOut, name: str) -> str:
    return number((job.metrics or {}).get(name))


def _progress(job: JobOut) -> str:
    total = job.progress.total_steps
    return f"{job.progress.step}/{total}" if total else str(job.progress.step)


def register(app: typer.Typer) -> None:
    @app.command("submit")
    def submit_cmd(
        spec_file: Annotated[Path, typer.Argument(help="Job spec (JSON or YAML)")],
        overrides: SetOption = None,
        wait: Annotated[bool, typer.Option("--wait", help="Follow the job until it ends")] = False,
        upload: Annotated[
            bool, typer.Option("--upload", help="Upload dataset files from this machine and use their ids")
        ] = False,
        idempotency_key: Annotated[
            str | None, typer.Option("--idempotency-key", help="Reuse to make a repeated submit a no-op")
        ] = None,
        dry_run: Annotated[
            bool,
            typer.Option(
                "--dry-run", help="Check the spec and print the estimate (tokens, steps, FLOPs, duration)"
            ),
        ] = False,
        url: UrlOption = DEFAULT,
        token: TokenOption = None,
    ) -> None:
        """Queue a job; prints its id on stdout (progress and messages go to stderr); --dry-run queues nothing."""
        with connected(url, token) as client:
            spec = load_spec_dict(spec_file, overrides)
            if upload:
                upload_local_data(client, spec)
            if dry_run:
                result = client.validate_job(spec)
                for line in validation_lines(result):
                    out.print(line, highlight=False, markup=False, soft_wrap=True)
                raise typer.Exit(0 if result.valid else 1)
            job = client.create_job(spec, idempotency_key=idempotency_key)
            err.print(
                f"queued {job.name} as {job.id}: {client.url}/#/jobs/{job.id}", highlight=False, markup=False
            )
            out.print(job.id, highlight=False, markup=False)
            if wait:
                raise typer.Exit(report_end(follow(client, job.id)))

    @app.command("list")
    def list_cmd(
        status: Annotated[
            str | None, typer.Option(help="queued, running, succeeded, failed or cancelled")
        ] = None,
        group: Annotated[str | None, typer.Option(help="Only jobs of this group (a sweep)")] = None,
        limit: Annotated[int, typer.Option(min=1, max=1000, help="How many jobs (newest first)")] = 20,
        as_json: Annotated[
            bool, typer.Option("--json", help="One JSON object per line instead of a table")
        ] = False,
        url: UrlOption = DEFAULT,
        token: TokenOption = None,
    ) -> None:
        """Jobs, newest first."""
        with connected(url, token) as client:
            page = client.list_jobs(status=status, group=group, limit=limit)
        if as_json:
            for job in page.data:
                typer.echo(job.model_dump_json())
            return
        table = Table("id", "name", "status", "step", "loss", "acc", "group", "created")
        for job in page.data:
            table.add_row(
                job.id,
                escape(job.name),
                job.status,
                _progress(job),
                _metric(job, "loss"),
                _metric(job, "rewards/accuracies"),
                job.group or "",
                job.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            )
        out.print(table)
        if page.next_cursor:
            err.print(f"(more than {limit}; use --limit)")

    @app.command("status")
    def status_cmd(
        job_id: Annotated[str, typer.Argument(help="Job id")],
        as_json: Annotated[bool, typer.Option("--json", help="The job as JSON")] = False,
        url: UrlOption = DEFAULT,
        token: TokenOption = None,
    ) -> None:
        """One job: status, progress, latest metrics, error."""
        with connected(url, token) as client:
            job = client.get_job(job_id)
        if as_json:
            out.print_json(job.model_dump_json())
            return
        table = Table(show_header=False, box=None)
        rows = [
            ("id", job.id),
            ("name", job.name),
            ("status", job.status + (" (cancel requested)" if job.cancel_requested else "")),
            ("progress", _progress(job) + " steps"),
            ("queue position", str(job.queue_position) if job.queue_position else ""),
            ("waiting for", job.queue_reason or ""),
            ("started from", _source(job)),
            ("group", job.group or ""),
            ("created", job.created_at.isoformat()),
            ("started", job.started_at.isoformat() if job.started_at else ""),
            ("finished", job.finished_at.isoformat() if job.finished_at else ""),
            ("error", f"{job.error.code}: {job.error.message}" if job.error else ""),
        ]
        rows += [(name, _metric(job, name)) for name in SUMMARY_METRICS if name in (job.metrics or {})]
        for key, value in rows:
            if value:
                table.add_row(f"[bold]{key}[/bold]", escape(value))
        out.print(table)

    @app.command("cancel")
    def cancel_cmd(
        job_id: Annotated[str, typer.Argument(help="Job id")],
        url: UrlOption = DEFAULT,
        token: TokenOption = None,
    ) -> None:
        """Request cancellation (a running job stops at its next step)."""
        with connected(url, token) as client:
            job = client.cancel_job(job_id)
        state = "cancel requested" if job.cancel_requested and job.status == "running" else job.status
        out.print(f"{job.id} {state}", highlight=False, markup=False)

    @app.command("events")
    def events_cmd(
        job_id: Annotated[str, typer.Argument(help="Job id")],
        follow_: Annotated[
            bool, typer.Option("--follow", "-f", help="Keep following until the job ends")
        ] = False,
        as_json: Annotated[bool, typer.Option("--json", help="JSON lines")] = False,
        url: UrlOption = DEFAULT,
        token: TokenOption = None,
    ) -> None:
        """A job's events (status changes, checkpoints, retries, webhooks); --follow streams new ones."""
        with connected(url, token) as client:
            last_seq = 0
            for event in client.iter_stored_events(job_id):
                last_seq = event.seq
                if as_json:
                    typer.echo(event.model_dump_json())
                else:
                    out.print(
                        f"{event.seq:>4} {event.time:%H:%M:%S} {event.kind:<16} {event.message}",
                        highlight=False,
                        markup=False,
                    )
            if follow_:
                step = client.get_job(job_id).progress.step  # metric rows are not events: start after them
                for message in client.events(job_id, last_event_id=f"{last_seq}.{step}"):
                    if message.type == "metrics":
                        continue
                    if as_json:
                        typer.echo(json.dumps({"type": message.type, **message.data}))
                    else:
                        kind = message.data.get("kind") or message.type
                        out.print(
                            f"{message.data.get('seq', ''):>4} {kind:<16} {message.data.get('message', '')}",
                            highlight=False,
                            markup=False,
                        )

    @app.command("metrics")
    def metrics_cmd(
        job_id: Annotated[str, typer.Argument(help="Job id")],
        names: Annotated[str | None, typer.Option(help="Comma-separated metric names (default: all)")] = None,
        as_csv: Annotated[bool, typer.Option("--csv", help="Every row as CSV on stdout")] = False,
        max_points: Annotated[int, typer.Option(min=2, help="Rows in the table view (downsampled)")] = 20,
        url: UrlOption = DEFAULT,
        token: TokenOption = None,
    ) -> None:
        """A job's metric series: a downsampled table, or every row as CSV (--csv)."""
        wanted = [n.strip() for n in names.split(",") if n.strip()] if names else None
        with connected(url, token) as client:
            if as_csv:
                rows = list(client.iter_metrics(job_id, names=wanted))
                columns = ["step", "time"] + sorted({k for row in rows for k in row} - {"step", "time"})
                writer = csv.DictWriter(
                    sys.stdout, fieldnames=columns, extrasaction="ignore", lineterminator="\n"
                )
                writer.writeheader()
                writer.writerows(rows)
                return
            series = client.metrics(job_id, names=wanted or list(SUMMARY_METRICS), max_points=max_points)
        columns = sorted({k for row in series.data for k in row} - {"step", "time"})
        table = Table("step", *columns)
        for row in series.data:
            table.add_row(
                str(row["step"]),
                *(number(row.get(c)) for c in columns),
            )
        out.print(table)


def _source(job: Any) -> str:
    """The job this one was chained from (`model.from_job`), with the checkpoint step if one was named."""
    if not job.source_job:
        return ""
    return job.source_job + (f" (step {job.source_step})" if job.source_step is not None else "")

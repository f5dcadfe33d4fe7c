"""`minordpo watch ID`: a live progress bar (step/total, ETA, loss, accuracy) from the job's event stream."""

from __future__ import annotations

from typing import Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cli.connection import DEFAULT, TokenOption, UrlOption, connected
from cli.output import err, number
from core.schemas import JobOut
from minordpo_client import Client, StreamMessage

EXIT_CODES = {"succeeded": 0, "failed": 1, "cancelled": 1}


class JobProgress:
    """Turns stream messages into one Rich progress bar plus a log line per status change or event."""

    def __init__(self, client: Client, job: JobOut, progress: Progress) -> None:
        self.client = client
        self.job_id = job.id
        self.progress = progress
        self.task: TaskID = progress.add_task(
            job.name,
            total=job.progress.total_steps,
            completed=job.progress.step,
            stats=self._stats(job.metrics),
        )

    @staticmethod
    def _stats(values: dict[str, Any] | None) -> str:
        values = values or {}
        return f"loss {number(values.get('loss'))}  acc {number(values.get('rewards/accuracies'))}"

    def __call__(self, message: StreamMessage) -> None:
        data = message.data
        if message.type == "metrics":
            update: dict[str, Any] = {"completed": data.get("step", 0)}
            if self.progress.tasks[self.task].total is None:
                update["total"] = self.client.get_job(self.job_id).progress.total_steps
            values = data.get("values") or {}
            if "loss" in values:
                update["stats"] = self._stats(values)
            self.progress.update(self.task, **update)
        elif message.type == "status":
            self.progress.console.print(
                f"[bold]{data.get('status')}[/bold] {escape(str(data.get('message', '')))}", highlight=False
            )
            if data.get("error"):
                error = data["error"]
                self.progress.console.print(
                    f"[red]{escape(str(error.get('code')))}: {escape(str(error.get('message')))}[/red]",
                    highlight=False,
                )
        elif message.type == "event":
            self.progress.console.print(
                f"[dim]{escape(str(data.get('kind')))}[/dim] {escape(str(data.get('message', '')))}",
                highlight=False,
            )


def progress_bar() -> Progress:
    """The bar layout shared by watch and submit --wait."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}"),
        console=err,
        transient=False,
    )


def follow(client: Client, job_id: str) -> JobOut:
    """Show a job's progress until it ends; returns the final job."""
    job = client.get_job(job_id)
    with progress_bar() as progress:
        view = JobProgress(client, job, progress)
        final = client.wait(job_id, on_message=view)
        progress.update(view.task, completed=final.progress.step, stats=JobProgress._stats(final.metrics))
    return final


def report_end(job: JobOut) -> int:
    """Print how the job ended; returns the exit code (0 succeeded, 1 failed or cancelled)."""
    if job.status == "succeeded":
        err.print(f"[green]succeeded[/green] {job.id} at step {job.progress.step}", highlight=False)
    elif job.error is not None:
        err.print(
            f"[red]{job.status}[/red] {job.id}: {escape(job.error.code)}: {escape(job.error.message)}",
            highlight=False,
        )
    else:
        err.print(f"[yellow]{job.status}[/yellow] {job.id}", highlight=False)
    return EXIT_CODES.get(job.status, 1)


def register(app: typer.Typer) -> None:
    @app.command("watch")
    def watch_cmd(
        job_id: str = typer.Argument(help="Job id"), url: UrlOption = DEFAULT, token: TokenOption = None
    ) -> None:
        """Follow a job live until it ends; exits non-zero when it fails or is cancelled."""
        with connected(url, token) as client:
            final = follow(client, job_id)
        raise typer.Exit(report_end(final))

"""A Rich progress bar as a training Reporter: step/total, loss, accuracy, pairs/s and ETA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class ConsoleReporter:
    """Shows a live progress bar and prints events above it."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}  {task.fields[pps]} pairs/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task: Any = None

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        if kind == "started" and data:
            self.progress.start()
            self.task = self.progress.add_task(
                "train",
                total=data["total_steps"],
                completed=data.get("start_step", 0),
                loss="-",
                acc="-",
                pps="-",
            )
        elif kind in {"completed", "cancelled"}:
            self.progress.stop()
        self.console.print(f"[dim]{kind}[/dim] {message}")

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if self.task is None or "loss" not in values:
            if any(k.startswith("eval/") for k in values):
                acc = values.get("eval/rewards/accuracies", float("nan"))
                self.console.print(
                    f"[dim]eval[/dim] step {step}: loss {values.get('eval/loss', float('nan')):.4f}, accuracy {acc:.3f}"
                )
            return
        self.progress.update(
            self.task,
            completed=step,
            loss=f"{values['loss']:.4f}",
            acc=f"{values['rewards/accuracies']:.2f}"
            if "rewards/accuracies" in values
            else "-",  # none in sft
            pps=f"{values.get('pairs_per_second', 0.0):.1f}",
        )

    def checkpoint(self, step: int, path: Path | None, values: dict[str, float]) -> None:
        self.console.print(f"[dim]checkpoint[/dim] step {step} -> {path}")

    def generations(self, step: int, samples: list[dict[str, Any]]) -> None:
        self.console.print(f"[dim]generations[/dim] step {step}: {len(samples)} greedy completions")

    def close(self) -> None:
        self.progress.stop()

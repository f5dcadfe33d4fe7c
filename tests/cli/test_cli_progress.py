"""The terminal progress bar of `minordpo train` shows what each kind of job reports."""

from __future__ import annotations

import io

from rich.console import Console

from cli.progress import ConsoleReporter


def _shown(values: dict[str, float]) -> str:
    out = io.StringIO()
    reporter = ConsoleReporter(Console(file=out, width=200, force_terminal=False))
    reporter.event("started", "training started", {"total_steps": 2})
    reporter.metrics(1, values)
    reporter.event("completed", "done", {})
    return out.getvalue()


def test_a_dpo_step_shows_loss_and_accuracy() -> None:
    shown = _shown({"loss": 0.6931, "rewards/accuracies": 0.75, "pairs_per_second": 3.0})
    assert "loss 0.6931" in shown and "acc 0.75" in shown


def test_an_sft_step_has_no_accuracy_and_still_shows_its_loss() -> None:
    shown = _shown({"loss": 2.5, "nll": 2.5, "logps/chosen": -40.0})
    assert "loss 2.5000" in shown and "acc -" in shown

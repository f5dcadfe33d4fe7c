"""The study's jobs through the HTTP API: the specs, submitting, following them to the end, reading metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from minordpo_client import Client
from minordpo_client.client import TERMINAL

EVAL_NAMES = ("eval/rewards/accuracies", "eval/logps/chosen", "eval/logps/rejected", "eval/rewards/margins")
SFT_EVAL_NAMES = ("eval/nll", "eval/logps/chosen")


@dataclass(frozen=True)
class Settings:
    """Everything that sizes a study run (the --quick and full presets differ only here)."""

    model_size: str
    n_eval: int
    n_train: int
    max_length: int
    sft_steps: int
    sft_batch: int
    sft_lr: float
    sft_workers: int
    sweep_steps: int
    sweep_batch: int
    learning_rates: tuple[float, ...]
    losses: tuple[str, ...]
    seeds: tuple[int, ...]
    beta: float
    concurrent: int


def _data(train: Path, held_out: Path, max_rows: int) -> dict[str, Any]:
    return {"train": str(train), "eval": str(held_out), "max_rows": max_rows}


def sft_spec(
    s: Settings, model: Path, train: Path, held_out: Path, *, steps: int, lr: float
) -> dict[str, Any]:
    """SFT on the chosen answers of the training split, evaluated on the held-out split at the end."""
    return {
        "name": f"study sft lr {lr:g}",
        "model": str(model),
        "dataset": _data(train, held_out, s.n_train),
        "loss": {"type": "sft"},
        "training": {
            "max_steps": steps,
            "batch_size": s.sft_batch,
            "max_length": s.max_length,
            "learning_rate": lr,
            "warmup_steps": min(10, steps // 10),
            "lr_scheduler": "cosine",
        },
        "resources": {"num_workers": s.sft_workers, "cpus_per_worker": 1},
    }


def sweep_spec(
    s: Settings, sft_job: str, train: Path, held_out: Path, loss: str, lr: float, seed: int
) -> dict[str, Any]:
    """One sweep point, chained from the SFT job's final model; constant LR so the LR is the one studied."""
    return {
        "name": f"study {loss} lr {lr:g} seed {seed}",
        "model": {"from_job": sft_job},
        "dataset": _data(train, held_out, s.sweep_steps * s.sweep_batch),
        "loss": {"type": loss, "beta": s.beta},
        "training": {
            "max_steps": s.sweep_steps,
            "batch_size": s.sweep_batch,
            "max_length": s.max_length,
            "learning_rate": lr,
            "lr_scheduler": "constant",
            "seed": seed,
            "eval_every": max(1, s.sweep_steps // 2),
        },
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "group": "lr-study",
    }


def run_all(client: Client, specs: dict[str, dict[str, Any]], title: str) -> dict[str, Any]:
    """Submit every spec, follow them with a progress bar (one line per job as it ends); {key: final job}."""
    ids = {key: client.create_job(spec).id for key, spec in specs.items()}
    done: dict[str, Any] = {}
    columns = (TextColumn(title), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns) as bar:
            task = bar.add_task(title, total=len(ids))
            while len(done) < len(ids):
                for key, job_id in ids.items():
                    if key in done or (job := client.get_job(job_id)).status not in TERMINAL:
                        continue
                    done[key] = job
                    error = f" ({job.error.code}: {job.error.message})" if job.error else ""
                    bar.console.print(f"{key}: {job.status} in {_seconds(job):.0f} s{error}")
                    bar.advance(task)
                time.sleep(2.0)
    except BaseException:
        for key, job_id in ids.items():  # a Ctrl-C or error leaves nothing running on a --url service
            if key not in done:
                client.cancel_job(job_id)
        raise
    return done


def _seconds(job: Any) -> float:
    return (job.finished_at - job.started_at).total_seconds() if job.started_at and job.finished_at else 0.0


def last_values(client: Client, job_id: str, names: tuple[str, ...]) -> dict[str, float | None]:
    """Each metric's last reported value (None: never reported)."""
    last: dict[str, float | None] = dict.fromkeys(names)
    for row in client.iter_metrics(job_id, names=list(names)):
        for name in names:
            if row.get(name) is not None:
                last[name] = float(row[name])
    return last


def series(client: Client, job_id: str, name: str) -> list[tuple[int, float]]:
    """(step, value) of one metric over the job."""
    return [
        (int(r["step"]), float(r[name]))
        for r in client.iter_metrics(job_id, names=[name])
        if r.get(name) is not None
    ]

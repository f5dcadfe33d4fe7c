"""How the training loop talks to the world: a small Reporter interface and its console/JSONL forms.

Besides events, metrics and checkpoints, a run reports eval generations: at each eval step, a list of
``{index, prompt, chosen, completion}`` samples (training.eval_generations, core.generations).

The loop calls every hook on every rank with identical, already-reduced values; a reporter that
should write once (console, files) is simply only given to rank 0. The database and Ray reporters
live with the service and the workers, so the loop knows nothing of HTTP or Ray.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Protocol, TextIO


class Reporter(Protocol):
    """Receives metrics, checkpoints and lifecycle events from the training loop."""

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None: ...

    def metrics(self, step: int, values: dict[str, float]) -> None: ...

    def checkpoint(self, step: int, path: Path | None, values: dict[str, float]) -> None: ...

    def generations(self, step: int, samples: list[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


class NullReporter:
    """Discards everything (ranks other than 0, tests)."""

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        pass

    def metrics(self, step: int, values: dict[str, float]) -> None:
        pass

    def checkpoint(self, step: int, path: Path | None, values: dict[str, float]) -> None:
        pass

    def generations(self, step: int, samples: list[dict[str, Any]]) -> None:
        pass

    def close(self) -> None:
        pass


class MultiReporter(NullReporter):
    """Fans every call out to several reporters in order."""

    def __init__(self, *reporters: Reporter) -> None:
        self.reporters = [r for r in reporters if r is not None]

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        for r in self.reporters:
            r.event(kind, message, data)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        for r in self.reporters:
            r.metrics(step, values)

    def checkpoint(self, step: int, path: Path | None, values: dict[str, float]) -> None:
        for r in self.reporters:
            r.checkpoint(step, path, values)

    def generations(self, step: int, samples: list[dict[str, Any]]) -> None:
        for r in self.reporters:
            r.generations(step, samples)

    def close(self) -> None:
        for r in self.reporters:
            r.close()


class JsonlReporter(NullReporter):
    """Appends `metrics.jsonl` (one row per step), `events.jsonl` and `generations.jsonl` under a run directory."""

    def __init__(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics: TextIO = (run_dir / "metrics.jsonl").open("a", encoding="utf-8")
        self._events: TextIO = (run_dir / "events.jsonl").open("a", encoding="utf-8")
        self._generations_path = run_dir / "generations.jsonl"

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        row = {"time": time.time(), "kind": kind, "message": message, "data": data or {}}
        self._events.write(json.dumps(row) + "\n")
        self._events.flush()

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self._metrics.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self._metrics.flush()

    def checkpoint(self, step: int, path: Path | None, values: dict[str, float]) -> None:
        self.event("checkpoint", f"checkpoint at step {step}", {"step": step, "path": str(path)})

    def generations(self, step: int, samples: list[dict[str, Any]]) -> None:
        with self._generations_path.open("a", encoding="utf-8") as fh:  # created only by a run that has them
            fh.write(json.dumps({"step": step, "time": time.time(), "samples": samples}) + "\n")

    def close(self) -> None:
        self._metrics.close()
        self._events.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All rows of a JSONL file written by JsonlReporter."""
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]

"""`POST /v1/jobs:validate`'s estimate: tokens and steps as the loop consumes them, FLOPs, measured duration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.models import load_model, make_tiny_model
from core.reporting import NullReporter
from core.spec import JobSpec
from core.store import Database, append_metrics, transition
from core.training import RunOptions, train
from tests.api.conftest import PAIRS, auth, write_jsonl
from tests.conftest import GPT2_FILE

LONG_PAIRS = [
    {
        "prompt": "Say something long. " * (i % 5 + 1),
        "chosen": " word" * (3 + i),
        "rejected": " no" * (1 + i % 4),
    }
    for i in range(9)
]


class LastMetrics(NullReporter):
    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.last.update(values)


@pytest.fixture
def tiny(roots: Path) -> Path:
    return make_tiny_model(roots / "models" / "tiny", tokenizer=GPT2_FILE, size="tiny", seed=0)


def spec_for(tiny: Path, roots: Path, **training: Any) -> dict[str, Any]:
    write_jsonl(roots / "mixed.jsonl", PAIRS + LONG_PAIRS)
    return {
        "name": "estimate",
        "model": str(tiny),
        "dataset": {"train": str(roots / "mixed.jsonl"), "eval_fraction": 0.1},
        "loss": {"type": "sigmoid"},
        "training": {"batch_size": 3, "max_length": 24, **training},
    }


def validate(client: TestClient, spec: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/v1/jobs:validate", json=spec, headers=auth())
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("training", [{"epochs": 2, "grad_accum_steps": 2}, {"max_steps": 7}])
def test_tokens_and_steps_are_what_the_loop_consumes(
    client: TestClient, tiny: Path, roots: Path, tmp_path: Path, training: dict[str, Any]
) -> None:
    body = validate(client, spec_for(tiny, roots, **training))
    estimate = body["estimate"]
    assert body["dataset"]["truncated_rows"] > 0  # the counts are after truncation
    recorder = LastMetrics()
    result = train(JobSpec.model_validate(body["spec"]), RunOptions(output_dir=tmp_path / "run"), recorder)
    assert estimate["steps"] == result.total_steps == result.step
    assert (estimate["train_pairs"], estimate["eval_pairs"]) == (
        result.report.train_rows,
        result.report.eval_rows,
    )
    assert estimate["total_train_tokens"] == int(recorder.last["num_tokens"])
    # FLOPs from the model's own parameter count: 6 N per token trained, plus the cached reference pass.
    n = sum(p.numel() for p in load_model(str(tiny)).parameters())
    assert estimate["parameters"] == n
    per_step = estimate["total_train_tokens"] / estimate["steps"]
    assert estimate["flops_per_step"] == pytest.approx(6 * n * per_step)
    cached = 2 * n * (estimate["train_tokens"] + estimate["eval_tokens"])
    assert estimate["total_flops"] == pytest.approx(estimate["flops_per_step"] * estimate["steps"] + cached)
    assert "6 × parameters × tokens per step" in estimate["basis"]["flops"]


def test_an_sft_estimate_counts_prompt_and_chosen_and_no_reference(
    client: TestClient, tiny: Path, roots: Path, tmp_path: Path
) -> None:
    spec = {**spec_for(tiny, roots, max_steps=5), "loss": {"type": "sft"}}
    estimate = validate(client, spec)["estimate"]
    recorder = LastMetrics()
    train(JobSpec.model_validate(spec), RunOptions(output_dir=tmp_path / "run"), recorder)
    assert estimate["total_train_tokens"] == int(recorder.last["num_tokens"])
    assert estimate["total_flops"] == pytest.approx(
        estimate["flops_per_step"] * estimate["steps"]
    )  # no reference
    assert estimate["basis"]["tokens"].startswith("prompt + chosen tokens")
    pairs = validate(client, spec_for(tiny, roots, max_steps=5))["estimate"]
    assert estimate["train_tokens"] < pairs["train_tokens"]  # the rejected answers are not counted


def test_live_reference_adds_its_forward(client: TestClient, tiny: Path, roots: Path) -> None:
    estimate = validate(client, spec_for(tiny, roots, max_steps=3, precompute_ref_logps=False))["estimate"]
    per_step = estimate["total_train_tokens"] / 3
    assert estimate["flops_per_step"] == pytest.approx(8 * estimate["parameters"] * per_step)
    assert estimate["total_flops"] == pytest.approx(estimate["flops_per_step"] * 3)
    assert "live reference forward" in estimate["basis"]["flops"]


def test_no_history_means_no_duration(client: TestClient, tiny: Path, roots: Path) -> None:
    estimate = validate(client, spec_for(tiny, roots, max_steps=3))["estimate"]
    assert estimate["duration_s"] is None and estimate["tokens_per_second"] is None
    assert estimate["basis"]["duration"].startswith("null: this cluster has no measured throughput")


def succeeded_job(
    client: TestClient, db: Database, spec: dict[str, Any], rows: list[tuple[int, float, float]]
) -> str:
    """A stored job that succeeded after reporting (step, time, num_tokens) rows."""
    r = client.post("/v1/jobs", json=spec, headers=auth("team-b"))
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    with db.write() as session:
        transition(session, job_id, "running")
        append_metrics(session, job_id, [{"step": s, "time": t, "num_tokens": n} for s, t, n in rows])
        transition(session, job_id, "succeeded")
    return job_id


def test_duration_from_a_succeeded_job_of_the_same_size_and_resources(
    client: TestClient, db: Database, tiny: Path, roots: Path
) -> None:
    spec = spec_for(tiny, roots, max_steps=4)
    # 900 tokens in 3 s between its first and last rows: 300 tokens/s (another project's job counts too).
    succeeded_job(client, db, spec, [(1, 1000.0, 100.0), (2, 1001.0, 400.0), (4, 1003.0, 1000.0)])
    # Other resources, and a model 25 times larger: neither is like the job estimated.
    succeeded_job(client, db, {**spec, "resources": {"num_workers": 2}}, [(1, 0.0, 0.0), (2, 1.0, 10.0)])
    big = make_tiny_model(roots / "models" / "big", tokenizer=GPT2_FILE, size="small", seed=0)
    succeeded_job(client, db, {**spec, "model": str(big)}, [(1, 0.0, 0.0), (2, 1.0, 10.0)])
    # A job that has not succeeded is not history.
    r = client.post("/v1/jobs", json=spec, headers=auth())
    with db.write() as session:
        transition(session, r.json()["id"], "running")
        append_metrics(
            session,
            r.json()["id"],
            [{"step": 1, "time": 0.0, "num_tokens": 0.0}, {"step": 2, "time": 1.0, "num_tokens": 5.0}],
        )

    estimate = validate(client, spec)["estimate"]
    assert estimate["tokens_per_second"] == pytest.approx(300.0)
    assert estimate["duration_s"] == pytest.approx(estimate["total_train_tokens"] / 300.0)
    basis = estimate["basis"]["duration"]
    assert "median of 1 succeeded job(s)" in basis and "1 worker(s), CPU per worker, ddp" in basis

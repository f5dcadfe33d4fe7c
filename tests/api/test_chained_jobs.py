"""Chained jobs: `model.from_job` (+ `step`) trains from exactly the source job's final model or checkpoint."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.models import make_tiny_model
from core.reporting import NullReporter
from core.settings import Settings
from core.spec import JobSpec
from core.store import Database, add_checkpoint, append_event, transition
from core.training import RunOptions, train
from tests.api.conftest import auth, write_jsonl
from tests.conftest import GPT2_FILE

EVAL_PAIRS = [
    {"prompt": f"Tell me about {w}.", "chosen": f" {w} is a word.", "rejected": " I will not."}
    for w in ("rain", "snow", "wind", "sun")
]


class Recorder(NullReporter):
    """Metric rows and checkpoints a run reports."""

    def __init__(self) -> None:
        self.rows: dict[int, dict[str, float]] = {}
        self.checkpoints: list[tuple[int, Path]] = []

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.rows.setdefault(step, {}).update(values)

    def checkpoint(self, step: int, path: Path | None, values: dict[str, float]) -> None:
        assert path is not None
        self.checkpoints.append((step, path))


def run(spec: dict[str, Any], output_dir: Path) -> Recorder:
    recorder = Recorder()
    result = train(JobSpec.model_validate(spec), RunOptions(output_dir=output_dir), recorder)
    assert result.status == "completed"
    return recorder


def job_spec(model: Any, train_file: Path, eval_file: Path | None = None, **training: Any) -> dict[str, Any]:
    return {
        "name": "chain",
        "model": model,
        "dataset": {"train": str(train_file), **({"eval": str(eval_file)} if eval_file else {})},
        "loss": {"type": "sigmoid", "beta": 0.1},
        "training": {"batch_size": 4, "max_length": 64, "learning_rate": 1e-2, "seed": 0, **training},
    }


@pytest.fixture
def source(client: TestClient, db: Database, settings: Settings, roots: Path) -> dict[str, Any]:
    """A team-a job trained in process for 4 steps (checkpoint and eval at step 2, eval at 4), recorded as
    the workers record it: checkpoints, the final model event, succeeded."""
    model = make_tiny_model(roots / "models" / "tiny", tokenizer=GPT2_FILE, size="tiny", seed=0)
    eval_file = write_jsonl(roots / "eval.jsonl", EVAL_PAIRS)
    spec = job_spec(
        str(model), roots / "train.jsonl", eval_file, max_steps=4, eval_every=2, checkpoint_every=2
    )
    r = client.post("/v1/jobs", json=spec, headers=auth("team-a"))
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    recorder = run(r.json()["spec"], settings.artifacts_dir / "jobs" / job_id)
    with db.write() as session:
        for step, path in recorder.checkpoints:
            add_checkpoint(session, job_id, step, str(path))
        final = settings.artifacts_dir / "jobs" / job_id / "final"
        append_event(session, job_id, "final_model", "final model saved", {"path": str(final)})
        transition(session, job_id, "running")
        transition(session, job_id, "succeeded")
    return {
        "id": job_id,
        "rows": recorder.rows,
        "eval_file": eval_file,
        "final": final.resolve(),
        "model": str(model),
    }


def chain(client: TestClient, model: Any, eval_file: Path) -> dict[str, Any]:
    """Submit a 1-step job over the source's eval pairs (one batch of all of them) starting from `model`."""
    r = client.post("/v1/jobs", json=job_spec(model, eval_file, max_steps=1), headers=auth("team-a"))
    assert r.status_code == 201, r.text
    return r.json()


def assert_first_step_matches(chained: dict[str, Any], source_eval: dict[str, float], out: Path) -> None:
    """The chained job's step 1 scores the weights it starts from: the source's eval of those weights."""
    first = run(chained["spec"], out).rows[1]
    for name in ("logps/chosen", "logps/rejected"):
        assert first[name] == pytest.approx(source_eval[f"eval/{name}"], rel=1e-5, abs=1e-5), name
    # Its reference is the same weights, so the sigmoid loss starts at log 2.
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_from_job_trains_from_the_final_model_and_from_a_checkpoint(
    client: TestClient, source: dict[str, Any], tmp_path: Path
) -> None:
    rows, eval_file = source["rows"], source["eval_file"]
    assert rows[2]["eval/logps/chosen"] != pytest.approx(rows[4]["eval/logps/chosen"], rel=1e-3)

    final = chain(client, {"from_job": source["id"]}, eval_file)
    assert final["spec"]["model"]["path"] == str(source["final"])
    assert (final["source_job"], final["source_step"]) == (source["id"], None)
    assert_first_step_matches(final, rows[4], tmp_path / "from-final")

    step = chain(client, {"from_job": source["id"], "step": 2}, eval_file)
    assert (step["source_job"], step["source_step"]) == (source["id"], 2)
    folder = Path(step["spec"]["model"]["path"])
    assert folder.is_dir() and folder != source["final"]
    # The folder stays whole when the source rotates its checkpoint away.
    shutil.rmtree(
        client.get(f"/v1/jobs/{source['id']}/checkpoints", headers=auth()).json()["data"][0]["path"]
    )
    assert_first_step_matches(step, rows[2], tmp_path / "from-step")

    alias = chain(client, source["id"], eval_file)  # model.path: job_... is from_job
    assert alias["spec"]["model"]["path"] == str(source["final"]) and alias["source_job"] == source["id"]

    r = client.get(f"/v1/jobs/{source['id']}/derived", headers=auth())
    assert r.status_code == 200, r.text
    assert [(d["id"], d["source_step"]) for d in r.json()["data"]] == [
        (final["id"], None),
        (step["id"], 2),
        (alias["id"], None),
    ]
    assert client.get(f"/v1/jobs/{source['id']}/derived", headers=auth("team-b")).status_code == 404


def problem(client: TestClient, model: Any, eval_file: Path, project: str = "team-a") -> tuple[int, Any]:
    r = client.post("/v1/jobs", json=job_spec(model, eval_file, max_steps=1), headers=auth(project))
    assert r.headers["content-type"] == "application/problem+json", r.text
    return r.status_code, r.json()


def test_bad_sources_are_clear_problems(
    client: TestClient, db: Database, source: dict[str, Any], settings: Settings
) -> None:
    job_id, eval_file = source["id"], source["eval_file"]
    status, body = problem(client, {"from_job": job_id}, eval_file, project="team-b")
    assert status == 404 and body["detail"] == f"job '{job_id}' not found"
    unknown = "job_" + "0" * 26
    status, body = problem(client, {"from_job": unknown, "step": 2}, eval_file)
    assert status == 404 and body["detail"] == f"job '{unknown}' not found"

    status, body = problem(client, {"from_job": job_id, "step": 3}, eval_file)
    assert status == 422 and body["errors"] == [
        {"loc": "model.step", "msg": f"job '{job_id}' has no checkpoint at step 3; available steps: 2"}
    ]
    checkpoints = settings.artifacts_dir / "jobs" / job_id / "checkpoints"
    lora = checkpoints / "step-0000005" / "model"
    lora.mkdir(parents=True)
    (lora / "adapter_config.json").write_text("{}", encoding="utf-8")
    (checkpoints / "step-0000006" / "sharded").mkdir(parents=True)
    with db.write() as session:
        add_checkpoint(session, job_id, 5, str(lora.parent))
        add_checkpoint(session, job_id, 6, str(checkpoints / "step-0000006"))
    status, body = problem(client, {"from_job": job_id, "step": 5}, eval_file)
    assert status == 422 and "holds LoRA adapter weights only" in body["errors"][0]["msg"]
    status, body = problem(client, {"from_job": job_id, "step": 6}, eval_file)
    assert status == 422 and "FSDP sharded (DCP) checkpoint" in body["errors"][0]["msg"]

    queued = chain(client, source["model"], eval_file)["id"]  # not started: no final model
    status, body = problem(client, {"from_job": queued}, eval_file)
    assert status == 422 and body["errors"] == [
        {
            "loc": "model.from_job",
            "msg": f"job '{queued}' has not saved a final model (status queued): chain from a succeeded job",
        }
    ]
    status, body = problem(client, {"path": str(source["final"]), "step": 2}, eval_file)
    assert status == 422 and "give from_job too" in body["detail"]

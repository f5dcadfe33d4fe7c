"""`minordpo make-tiny-model` and `minordpo train` as a person runs them (the README quickstart)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from core.reporting import read_jsonl
from core.settings import get_settings
from tests.conftest import GPT2_FILE, HH_FILE

runner = CliRunner()


@pytest.fixture(autouse=True)
def artifacts(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MINORDPO_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    get_settings.cache_clear()
    yield tmp_path / "artifacts"
    get_settings.cache_clear()


def test_quickstart_make_tiny_model_then_train_on_hh(tmp_path, artifacts):
    model_dir = tmp_path / "tiny-llama"
    made = runner.invoke(app, ["make-tiny-model", str(model_dir), "--tokenizer", str(GPT2_FILE.parent)])
    assert made.exit_code == 0, made.output
    assert (model_dir / "config.json").exists() and (model_dir / "tokenizer.json").exists()

    spec = tmp_path / "job.yaml"
    spec.write_text(
        f"name: hh-quick\nmodel: {model_dir}\n"
        f"dataset: {{train: {HH_FILE}, eval_fraction: 0.1, max_rows: 80}}\n"
        "loss: {type: minor_dpo, beta: 0.1}\n"
        "training: {max_steps: 3, batch_size: 8, learning_rate: 1.0e-3, eval_every: 3, eval_generations: 2,\n"
        "  eval_generation_tokens: 4}\n",
        encoding="utf-8",
    )
    result = runner.invoke(app, ["train", str(spec), "--set", "training.max_steps=4"])
    assert result.exit_code == 0, result.output
    run_dir = artifacts / "runs" / "hh-quick"
    assert "completed at step 4/4" in result.output
    assert "80 rows read" in result.output  # the validation report is printed
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    kinds = [e["kind"] for e in read_jsonl(run_dir / "events.jsonl")]
    assert kinds[:2] == ["preparing", "data"] and kinds[-1] == "completed"
    assert json.loads((run_dir / "spec.json").read_text())["training"]["max_steps"] == 4
    assert (run_dir / "final" / "model.safetensors").exists()
    generations = read_jsonl(run_dir / "generations.jsonl")  # at the eval of step 3 and the final one
    assert [(g["step"], len(g["samples"])) for g in generations] == [(3, 2), (4, 2)]
    assert "generations step 4: 2 greedy completions" in result.output


def test_bad_spec_is_one_clear_line_per_field(tmp_path):
    spec = tmp_path / "bad.json"
    spec.write_text(
        json.dumps(
            {"name": "x", "model": "m", "dataset": {"train": "d.jsonl"}, "loss": {"beta": -1}, "extra": 1}
        )
    )
    result = runner.invoke(app, ["train", str(spec)])
    assert result.exit_code == 2
    assert "loss.beta" in result.output and "extra" in result.output
    assert "Traceback" not in result.output


def test_bad_dataset_line_is_named(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "Hi", "chosen": " a", "rejected": " b"}\n{"prompt": "Hi", "chosen": " a"}\n')
    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: bad\nmodel: {tiny_model_dir}\ndataset: {{train: {data}, on_bad_row: fail}}\n")
    result = runner.invoke(app, ["train", str(spec)])
    assert result.exit_code == 2
    assert "line 2" in result.output and "rejected" in result.output
    assert "Traceback" not in result.output


def test_missing_model_is_a_clear_error(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: nomodel\nmodel: {tmp_path / 'nope'}\ndataset: {{train: {HH_FILE}}}\n")
    result = runner.invoke(app, ["train", str(spec)])
    assert result.exit_code == 2
    assert "cannot load tokenizer" in result.output


def test_a_chained_model_says_it_needs_the_service(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(
        f"name: chained\nmodel: {{from_job: job_01JABCDEFGHJKMNPQRSTVWXYZ0}}\ndataset: {{train: {HH_FILE}}}\n"
    )
    result = runner.invoke(app, ["train", str(spec)])
    assert result.exit_code == 2
    assert "model.from_job (job_01JABCDEFGHJKMNPQRSTVWXYZ0) names a job of the service" in result.output
    assert not (tmp_path / "runs").exists()


def test_make_tiny_model_with_a_missing_tokenizer_is_one_line(tmp_path):
    result = CliRunner().invoke(
        app, ["make-tiny-model", str(tmp_path / "m"), "--tokenizer", str(tmp_path / "nope")]
    )
    assert result.exit_code == 2
    assert "no tokenizer at" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m" / "config.json").exists()

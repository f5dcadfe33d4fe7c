"""hf:OWNER/NAME datasets: a local dataset repository folder loads through datasets.load_dataset, checks and trains."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from core.data import prepare_data
from core.data.errors import DatasetError
from core.data.hub import HUB_DATASETS_DIR
from core.spec import DatasetSpec, JobSpec

README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.jsonl
  - split: test
    path: data/test-*.jsonl
---
# A preference dataset laid out as on the hub
"""


def write_hub_repo(root: Path, name: str, rows: list[dict], eval_rows: list[dict]) -> Path:
    """`<root>/<name>`: README with `configs:` YAML and data/{train,test}-*.jsonl, as a hub dataset repository."""
    repo = root / name
    (repo / "data").mkdir(parents=True)
    (repo / "README.md").write_text(README)
    for split, items in (("train", rows), ("test", eval_rows)):
        lines = "".join(json.dumps(r) + "\n" for r in items)
        (repo / "data" / f"{split}-00000-of-00001.jsonl").write_text(lines)
    return repo


def pairs(source: Path, count: int) -> list[dict]:
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows[:count]]


@pytest.fixture
def hub_mirror(tmp_path, monkeypatch, learnable_pairs_file) -> Path:
    """MINORDPO_HUB_DATASETS_ROOT at a mirror holding someorg/prefs (row 3 of train lacks `rejected`)."""
    rows = pairs(learnable_pairs_file, 40)
    rows[2] = {**rows[2], "rejected": None}
    mirror = tmp_path / "mirror"
    write_hub_repo(mirror, "someorg/prefs", rows, pairs(learnable_pairs_file, 48)[40:])
    monkeypatch.setenv("MINORDPO_HUB_DATASETS_ROOT", str(mirror))
    monkeypatch.setenv("MINORDPO_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    monkeypatch.delenv("MINORDPO_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return mirror


def dataset_spec(**fields):
    return DatasetSpec.model_validate(fields)


def test_hub_dataset_loads_checks_rows_by_index_and_caches_under_artifacts(
    hub_mirror, tmp_path, gpt2_tokenizer
):
    spec = dataset_spec(train="hf:someorg/prefs", eval="hf:someorg/prefs")
    prepared = prepare_data(spec, gpt2_tokenizer, 256, 0)
    report = prepared.report
    assert (report.train_rows, report.eval_rows, report.rows_skipped) == (39, 8, 1)
    assert report.format == "standard"
    assert [(s.line, s.split) for s in report.skipped] == [(3, "train")]
    saved = list((tmp_path / "artifacts" / HUB_DATASETS_DIR / "saved").iterdir())
    assert len(saved) == 2 and all((p / "dataset_info.json").exists() for p in saved)


def test_hub_split_field_and_missing_split_with_a_mirror_while_offline(
    hub_mirror, monkeypatch, gpt2_tokenizer
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a local mirror needs no network
    spec = dataset_spec(train="hf:someorg/prefs", hub_split="test")
    assert prepare_data(spec, gpt2_tokenizer, 256, 0).report.train_rows == 8
    with pytest.raises(DatasetError, match="no split 'validation'") as err:
        prepare_data(dataset_spec(train="hf:someorg/prefs", hub_split="validation"), gpt2_tokenizer, 256, 0)
    assert err.value.path == "hf:someorg/prefs"


def test_unknown_dataset_is_one_line(hub_mirror, gpt2_tokenizer):
    with pytest.raises(DatasetError, match="'someorg/nothing' not found") as err:
        prepare_data(dataset_spec(train="hf:someorg/nothing"), gpt2_tokenizer, 256, 0)
    assert "\n" not in str(err.value)


def test_offline_refuses_at_once(monkeypatch, tmp_path, gpt2_tokenizer):
    monkeypatch.setenv("MINORDPO_ARTIFACTS_DIR", str(tmp_path))
    monkeypatch.delenv("MINORDPO_HUB_DATASETS_ROOT", raising=False)
    monkeypatch.delenv("MINORDPO_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(DatasetError, match="hub is offline") as err:
        prepare_data(dataset_spec(train="hf:someorg/prefs"), gpt2_tokenizer, 256, 0)
    assert time.monotonic() - started < 2
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("value", ["hf:", "hf:../etc", "hf:a/b/c", "hf:/abs"])
def test_bad_hub_ids_are_spec_errors(value):
    with pytest.raises(ValueError, match="not a hub dataset id"):
        dataset_spec(train=value)


@pytest.mark.parametrize("data_dir", ["../secrets", "/etc", "a/../../b", "~/x"])
def test_hub_data_dir_stays_inside_the_repository(data_dir):
    with pytest.raises(ValueError, match="inside the dataset repository"):
        dataset_spec(train="hf:someorg/prefs", hub_data_dir=data_dir)


def test_trains_in_process_from_a_hub_dataset(hub_mirror, tiny_model_dir, tmp_path):
    from core.training import RunOptions, train

    spec = JobSpec.model_validate(
        {
            "name": "hub",
            "model": str(tiny_model_dir),
            "dataset": {"train": "hf:someorg/prefs", "eval": "hf:someorg/prefs"},
            "loss": {"type": "sigmoid"},
            "training": {"batch_size": 8, "max_length": 256, "max_steps": 2, "eval_every": 2},
        }
    )
    result = train(spec, RunOptions(output_dir=tmp_path / "run"))
    assert result.status == "completed" and result.step == 2
    assert "eval/rewards/accuracies" in result.eval_metrics

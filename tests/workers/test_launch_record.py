"""The launch record: built once by the driver from the stored spec and the settings, then handed on pickled."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ray import cloudpickle

from core.data.limits import DataLimits
from core.settings import Settings
from core.spec import JobSpec
from core.store import Database, create_job, transition
from tests.driver_helpers import run_real_driver
from workers.conventions import job_output_dir
from workers.launch_record import LaunchRecord
from workers.run_outcome import RunOutcome

BODY = {
    "name": "launch",
    "model": {"path": "var/models/tiny"},
    "dataset": {"train": "d.jsonl"},
    "loss": {"type": "sigmoid", "beta": 0.2},
    "resources": {"num_workers": 2, "max_retries": 3},
}

UNPICKLE = """
import pickle, sys
record = pickle.loads(open(sys.argv[1], "rb").read())
print(type(record).__name__, type(record.spec).__name__, record.data_limits.max_json_depth)
print(record.spec.model_dump_json())
print(sorted(m for m in ("torch", "transformers", "ray") if m in sys.modules))
"""


def _record(artifacts_dir: Path) -> LaunchRecord:
    return LaunchRecord(
        "job-1",
        JobSpec.model_validate(BODY),
        artifacts_dir,
        allow_remote_code=True,
        data_limits=DataLimits(max_json_depth=7),
    )


def test_the_record_comes_back_equal_from_pickle_with_the_fields_the_spec_set() -> None:
    record = _record(Path("/srv/artifacts"))
    back = pickle.loads(cloudpickle.dumps(record))  # Ray's pickler, as for a task's arguments
    assert back == record and back is not record
    assert back.spec.model_fields_set == record.spec.model_fields_set
    assert back.spec.model_dump(exclude_unset=True) == BODY
    assert back.output_dir == job_output_dir(Path("/srv/artifacts"), "job-1")


def test_a_fresh_process_unpickles_the_record_by_import_alone_without_torch(tmp_path: Path) -> None:
    """What a warm Train worker does with train_loop_config: find the classes by import, nothing heavier."""
    record = _record(tmp_path)
    blob = tmp_path / "record.pkl"
    blob.write_bytes(cloudpickle.dumps(record))
    out = subprocess.run(
        [sys.executable, "-c", UNPICKLE, str(blob)], capture_output=True, text=True, timeout=120, check=True
    )
    names, spec_json, modules = out.stdout.strip().splitlines()
    assert names == "LaunchRecord JobSpec 7"
    assert spec_json == record.spec.model_dump_json()
    assert modules == "[]"


def test_unpickling_does_not_validate_the_spec_again() -> None:
    """A record is trusted as the driver built it: a value the schema would refuse comes through unchanged."""
    spec = JobSpec.model_validate(BODY).model_copy(update={"name": ""})  # min_length=1 for a validated spec
    back = pickle.loads(cloudpickle.dumps(LaunchRecord("job-1", spec, Path("/a"))))
    assert back.spec.name == ""


def test_from_settings_takes_the_artifacts_dir_and_the_operators_policy(tmp_path: Path) -> None:
    settings = Settings(artifacts_dir=tmp_path, allow_remote_code=True, max_line_bytes=4096)
    spec = JobSpec.model_validate(BODY)
    record = LaunchRecord.from_settings("job-2", spec, settings)
    assert (record.job_id, record.spec, record.artifacts_dir) == ("job-2", spec, tmp_path)
    assert record.allow_remote_code is True
    assert record.data_limits == settings.data_limits() and record.data_limits.max_line_bytes == 4096
    assert record.cache_dir == tmp_path / "cache"
    assert record.storage_path == (tmp_path / "ray").resolve()


def test_the_driver_hands_the_run_one_record_of_the_stored_job(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with db.write() as s:
        job, _ = create_job(s, project="p", spec=JobSpec.model_validate(BODY).model_dump(mode="json"))
        transition(s, job.id, "running")
    seen: list[Any] = []

    def fake_run_job(launch: LaunchRecord, **kw: Any) -> RunOutcome:
        seen.append(launch)
        return RunOutcome("succeeded", 1, 1)

    run_real_driver(
        monkeypatch,
        job.id,
        fake_run_job,
        database_url=str(db.engine.url),
        artifacts_dir=str(tmp_path / "artifacts"),
        max_json_depth="9",
    )
    [launch] = seen
    assert isinstance(launch, LaunchRecord) and isinstance(launch.spec, JobSpec)
    assert launch.job_id == job.id and launch.spec == JobSpec.model_validate(BODY)
    assert launch.artifacts_dir == tmp_path / "artifacts" and launch.data_limits.max_json_depth == 9

"""`minordpo submit --dry-run`: prints the server's estimate and queues nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app
from core.models import make_tiny_model
from minordpo_client import Client
from tests.conftest import GPT2_FILE
from tests.live_server import LiveServer


def test_dry_run_prints_the_estimate_and_queues_nothing(
    live_server: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_tiny_model(live_server.root / "tiny-dry-run", tokenizer=GPT2_FILE, size="tiny", seed=0)
    spec = live_server.spec("dry-run", model=str(model), training={"max_steps": 3, "batch_size": 2})
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("MINORDPO_URL", live_server.url)
    monkeypatch.setenv("MINORDPO_TOKEN", live_server.token)
    with Client(live_server.url, live_server.token) as client:
        before = len(client.list_jobs(limit=1000).data)
        expected = client.validate_job(spec).estimate
        result = CliRunner().invoke(app, ["submit", str(spec_file), "--dry-run"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert len(client.list_jobs(limit=1000).data) == before
    assert expected is not None
    lines = result.stdout.splitlines()
    assert lines[0] == "valid: yes (8 rows used)"
    assert "steps: 3 (4 per epoch, 1 batches per step per worker)" in lines
    assert f"tokens trained: {expected.total_train_tokens}" in lines
    assert f"parameters: {expected.parameters}" in lines
    assert "duration: unknown" in lines
    assert any(line.startswith("  duration: null: this cluster has no measured throughput") for line in lines)

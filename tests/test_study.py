"""bench/study_lr_robustness.py --quick runs the learning-rate study end to end through a real service."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1500)]
SCRIPT_TIMEOUT_S = 1200  # generous: a machine busy with other work takes many times as long as an idle one


def run_quick(out: Path, work: Path) -> tuple[int, str]:
    """Run the --quick study; past the timeout, SIGTERM it (it stops its jobs and service) and fail."""
    cmd = [sys.executable, "bench/study_lr_robustness.py", "--quick", "--out", str(out), "--work", str(work)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=SCRIPT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()
        output, _ = proc.communicate(timeout=180)
        pytest.fail(f"the quick study took over {SCRIPT_TIMEOUT_S} s:\n{output[-3000:]}")
    return proc.returncode, output


def test_quick_study_writes_a_row_per_loss_and_lr_chained_from_the_sft_job(tmp_path: Path) -> None:
    out = tmp_path / "out"
    returncode, output = run_quick(out, tmp_path / "w")
    assert returncode == 0, output[-3000:]
    result = json.loads((out / "results.json").read_text())
    settings = result["settings"]
    points = {(loss, lr) for loss in settings["losses"] for lr in settings["learning_rates"]}
    assert len(points) >= 4
    rows = result["jobs"]
    assert {(r["loss"], r["lr"]) for r in rows} == points and len(rows) == len(points) * len(
        settings["seeds"]
    )
    sft = result["sft"]
    for row in rows:
        assert row["status"] == "succeeded"
        assert row["source_job"] == sft["job_id"]  # as GET /v1/jobs/{id} reported it
        assert all(v is not None and math.isfinite(v) for v in row["final"].values()), row
        assert [step for step, _ in row["logps_chosen"]] == list(range(1, settings["sweep_steps"] + 1))
    assert all(math.isfinite(sft[when]["eval/nll"]) for when in ("before", "after"))
    assert sft["after"]["eval/nll"] < sft["before"]["eval/nll"]  # the SFT job learned something

    table = (out / "results.md").read_text()
    for loss, lr in points:
        assert f"| `{loss}` | {lr:g} |" in table
    for png in ("metrics_vs_lr.png", "logps_chosen_vs_step.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the script stopped the service it started, and the service its local Ray head
    assert "stopping the local Ray head" in (tmp_path / "w" / "service" / "serve.log").read_text()

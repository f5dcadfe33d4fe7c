"""bench/gpu_check.py --dry-run runs every stage end to end on CPU, so the GPU check cannot rot unseen."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_stage(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "bench/gpu_check.py",
            "--dry-run",
            "--out",
            str(tmp_path),
            "--config-timeout",
            "240",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stages = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert set(stages) == {"env", "parity", "throughput", "memory7b", "fsdp"}
    for name, stage in stages.items():
        failed = [r for r in stage["results"] if not r["ok"]]
        assert not failed, f"{name}: {failed}"
    assert stages["env"]["results"][0]["bf16_matmul_tflops"] > 0
    parity = stages["parity"]["results"]
    assert {(r["attn"], r["precision"]) for r in parity} == {
        (a, p) for a in ("flex_attention", "sdpa") for p in ("fp32", "bf16")
    }
    for r in parity:  # packed scorer == plain causal forwards (summed log-probs of hundreds of nats)
        assert r["max_rel_diff"] < (1e-5 if r["precision"] == "fp32" else 1e-2), r
    throughput = stages["throughput"]
    assert all(r["pairs_per_s"] > 0 for r in throughput["results"])
    assert throughput["summary"]["step1_logps_max_abs_diff_flex_vs_sdpa"] < 0.05  # bf16 rounding only
    layouts = {r["pairs_per_row"]: r for r in throughput["results"] if r["attn"] == "flex_attention"}
    assert (
        set(layouts) == {1, "auto"} and layouts["auto"]["padding_fraction"] <= layouts[1]["padding_fraction"]
    )
    assert throughput["summary"]["flex_rows_auto_over_one_pair_per_row_pairs_per_s"] > 0
    assert [r["layers"] for r in stages["memory7b"]["results"]] == [1, 2]
    fsdp = {r["precision"]: r for r in stages["fsdp"]["results"]}
    assert all(r["head_sharded_by_rows"] and r["weights_finite_after_adamw"] for r in fsdp.values())
    assert fsdp["fp32"]["logps_max_abs_diff"] < 1e-3 * fsdp["fp32"]["mean_abs_logp"]  # float rounding only
    assert max(fsdp["fp32"]["grad_rel_diff"].values()) < 1e-5
    assert fsdp["bf16"]["logps_max_abs_diff"] < 1e-2 * fsdp["bf16"]["mean_abs_logp"]  # bf16 cast vs autocast
    assert max(fsdp["bf16"]["grad_rel_diff"].values()) < 5e-2


def test_the_check_imports_nothing_the_device_image_lacks() -> None:
    """The device image has no pydantic, ray, trl or datasets: every core module a stage imports must
    load without them (a child process where importing them fails)."""
    modules = ["bench.gpu_stages", "core.packing", "core.attention", "core.scoring", "core.losses"]
    modules += ["core.precision", "core.sharding", "core.vocab_sharding", "core.models"]
    code = (
        "import sys\n"
        "for name in ('pydantic', 'ray', 'trl', 'datasets'):\n"
        "    sys.modules[name] = None\n"
        f"for module in {modules!r}:\n"
        "    __import__(module)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)

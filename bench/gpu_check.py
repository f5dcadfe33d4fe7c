"""One prepared GPU check: environment, packed-scorer parity, 1B throughput, 7B memory probe, one FSDP rank (bench/GPU.md).

Each configuration runs in its own subprocess (``--child``); every stage writes ``<stage>.json`` into
the output folder (``--out``, else ``$OUT``, else ``bench/out/gpu_check``) as soon as it finishes, so
a call cut short still returns the stages done. ``--dry-run`` runs every stage with tiny shapes on CPU.
The parent imports only the standard library.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STAGES = ("env", "parity", "throughput", "memory7b", "fsdp")
PARITY = [{"attn": a, "precision": p} for p in ("fp32", "bf16") for a in ("flex_attention", "sdpa")]
THROUGHPUT = [
    {"attn": "flex_attention", "precision": "bf16"},
    {"attn": "sdpa", "precision": "bf16"},
    {"attn": "flex_attention", "precision": "bf16", "pairs_per_row": None},  # several pairs per row
]
MEMORY = [{"layers": 1, "attn": "flex_attention"}, {"layers": 2, "attn": "flex_attention"}]
FSDP = [{"precision": p, "attn": "sdpa"} for p in ("bf16", "fp32")]
TRL_NOTE = "trl is not importable here (the device image has none): TRL DPOTrainer configurations skipped"


def child(kind: str, config: dict[str, Any], dry_run: bool) -> None:
    sys.path.insert(0, str(REPO))
    import bench.gpu_stages as stages

    result = getattr(stages, f"run_{kind}")(dry_run=dry_run, **config)
    print("RESULT " + json.dumps(result), flush=True)


def spawn(kind: str, config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter; its result, or the error and its output tail."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--config", json.dumps(config)]
    if args.dry_run:
        cmd.append("--dry-run")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.config_timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"config": config, "ok": False, "error": f"timed out after {args.config_timeout}s"}
    wall = time.perf_counter() - start
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {"config": config, "ok": True, "wall_s": wall, **json.loads(line[len("RESULT ") :])}
    tail = (proc.stdout + proc.stderr)[-3000:]
    return {"config": config, "ok": False, "wall_s": wall, "returncode": proc.returncode, "output_tail": tail}


def write(out: Path, stage: str, payload: dict[str, Any]) -> None:
    payload = {"stage": stage, "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **payload}
    (out / f"{stage}.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"[gpu_check] {stage}: wrote {out / f'{stage}.json'}", flush=True)


def stage_env(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    result = spawn("env", {}, args)
    write(out, "env", {"results": [result]})
    return result


def stage_parity(args: argparse.Namespace, out: Path) -> None:
    results = [spawn("parity", config, args) for config in PARITY]
    write(out, "parity", {"results": results})


def stage_throughput(args: argparse.Namespace, out: Path, ceiling: float | None) -> None:
    results = [spawn("throughput", {**config, "ceiling_tflops": ceiling}, args) for config in THROUGHPUT]
    ok = [r for r in results if r["ok"]]
    summary: dict[str, Any] = {}
    if len(ok) >= 2 and ok[0]["attn"] == "flex_attention" and ok[1]["attn"] == "sdpa":
        a, b = (r["step1_logps"] for r in ok[:2])
        diffs = [abs(x - y) for key in ("chosen", "rejected") for x, y in zip(a[key], b[key], strict=True)]
        summary["step1_logps_max_abs_diff_flex_vs_sdpa"] = max(diffs)
        summary["flex_over_sdpa_pairs_per_s"] = ok[0]["pairs_per_s"] / ok[1]["pairs_per_s"]
    rows = [r for r in ok if r.get("pairs_per_row") == "auto"]
    if rows and ok[0]["attn"] == "flex_attention" and ok[0].get("pairs_per_row") == 1:
        summary["flex_rows_auto_over_one_pair_per_row_pairs_per_s"] = (
            rows[0]["pairs_per_s"] / ok[0]["pairs_per_s"]
        )
    trl = "run bench/train_vs_trl.py for TRL (CPU)" if importable("trl") else TRL_NOTE
    write(out, "throughput", {"results": results, "summary": summary, "trl": trl})


def stage_memory(args: argparse.Namespace, out: Path) -> None:
    results = [spawn("memory", config, args) for config in MEMORY]
    extrapolation: dict[str, Any] = {"note": "a probe failed"}
    if all(r["ok"] for r in results):
        sys.path.insert(0, str(REPO))
        from bench.gpu_stages import extrapolate_memory  # imports torch: only after the children ran

        extrapolation = extrapolate_memory(results)
    write(out, "memory7b", {"results": results, "extrapolation": extrapolation})


def stage_fsdp(args: argparse.Namespace, out: Path) -> None:
    write(out, "fsdp", {"results": [spawn("fsdp", config, args) for config in FSDP]})


def importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, every stage")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {STAGES}")
    parser.add_argument("--config-timeout", type=int, default=300, help="seconds per configuration")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, json.loads(args.config), args.dry_run)
        return 0
    out = args.out or Path(os.environ.get("OUT") or REPO / "bench" / "out" / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(wanted) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
    ceiling = None
    for stage in STAGES:
        if stage not in wanted:
            continue
        if stage == "env":
            env = stage_env(args, out)
            ceiling = env.get("bf16_matmul_tflops") if env["ok"] else None
        elif stage == "parity":
            stage_parity(args, out)
        elif stage == "throughput":
            stage_throughput(args, out, ceiling)
        elif stage == "memory7b":
            stage_memory(args, out)
        else:
            stage_fsdp(args, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The learning-rate study as one command: SFT, then sigmoid/MinorDPO/DPOP/IPO × learning rates, via the service.

Starts a `minordpo serve` (local Ray, SQLite) in a work folder, or uses `--url` of a running one (which
must allow the work folder's paths), makes a random-init model, SFTs it on the chosen answers of the
shipped HH-RLHF pairs, chains a sweep from the SFT job through the HTTP API, reads every metric back
through the API and writes results.md, results.json and PNG plots to `--out` (default docs/study).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import time
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.study import data, jobs, report  # noqa: E402
from bench.study.service import REPO, running_service  # noqa: E402

LOSSES = ("sigmoid", "minor_dpo", "dpop", "ipo")
FULL = jobs.Settings(
    model_size="small", n_eval=32, n_train=1024, max_length=128,
    sft_steps=80, sft_batch=8, sft_lr=1e-3, sft_workers=2,
    sweep_steps=12, sweep_batch=8, learning_rates=(1e-4, 3e-4, 1e-3, 3e-3),
    losses=LOSSES, seeds=(0,), beta=0.1, concurrent=3,
)  # sized for ~45 min on 2 shared cores; 3 jobs at once overlap one job's start-up with others' steps  # fmt: skip
QUICK = dataclasses.replace(
    FULL, model_size="tiny", n_eval=8, n_train=32, max_length=64, sft_steps=3, sft_batch=8,
    sft_workers=1, sweep_steps=2, sweep_batch=4, learning_rates=(1e-4, 1e-2), losses=LOSSES[:2],
)  # a CI smoke run: every stage, two losses (each job's start-up dominates a tiny job)  # fmt: skip


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the jobs and the service as Ctrl-C does


def machine() -> str:
    """CPU model and cores, OS, Python and torch versions."""
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor() or "unknown CPU",
    )
    return f"{cpu}, {os.cpu_count()} cores; {platform.system()} {platform.release()}; Python {platform.python_version()}, torch {torch.__version__}"


def parameters(model: Path) -> int:
    """The model's parameter count, read from its safetensors headers."""
    from safetensors import safe_open

    total = 0
    for shard in model.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118
    return total


def run_sft(client: Any, s: jobs.Settings, model: Path, train: Path, held_out: Path) -> dict[str, Any]:
    """The SFT job and a 1-step job at a negligible LR (the random-init model's held-out NLL)."""
    before = jobs.sft_spec(s, model, train, held_out, steps=1, lr=1e-12)
    before["resources"]["num_workers"] = 1
    done = jobs.run_all(
        client,
        {
            "sft before": before,
            "sft": jobs.sft_spec(s, model, train, held_out, steps=s.sft_steps, lr=s.sft_lr),
        },
        "SFT",
    )
    if done["sft"].status != "succeeded":
        raise SystemExit(f"the SFT job {done['sft'].id} {done['sft'].status}: {done['sft'].error}")
    return {
        "job_id": done["sft"].id,
        "before": jobs.last_values(client, done["sft before"].id, jobs.SFT_EVAL_NAMES),
        "after": jobs.last_values(client, done["sft"].id, jobs.SFT_EVAL_NAMES),
        "nll_by_step": jobs.series(client, done["sft"].id, "loss"),
    }


def run_sweep(
    client: Any, s: jobs.Settings, sft_job: str, train: Path, held_out: Path
) -> list[dict[str, Any]]:
    """Every loss × LR × seed chained from the SFT job; each job's final held-out metrics and logps/chosen per step."""
    points = [(loss, lr, seed) for loss in s.losses for lr in s.learning_rates for seed in s.seeds]
    specs = {
        f"{loss} lr {lr:g} seed {seed}": jobs.sweep_spec(s, sft_job, train, held_out, loss, lr, seed)
        for loss, lr, seed in points
    }
    done = jobs.run_all(client, specs, "sweep")
    rows = []
    for (loss, lr, seed), job in zip(points, (done[key] for key in specs), strict=True):
        rows.append(
            {
                "loss": loss, "lr": lr, "seed": seed, "job_id": job.id, "status": job.status,
                "source_job": job.source_job,  # as GET /v1/jobs/{id} reports it
                "final": jobs.last_values(client, job.id, jobs.EVAL_NAMES),
                "logps_chosen": jobs.series(client, job.id, "logps/chosen"),
            }
        )  # fmt: skip
    return rows


def study(client: Any, s: jobs.Settings, work: Path) -> dict[str, Any]:
    model = data.make_model(work / "model", s.model_size)
    train, held_out = data.split_pairs(work / "data", s.n_eval, s.n_train)
    sft = run_sft(client, s, model, train, held_out)
    return {
        "params": parameters(model),
        "sft": sft,
        "jobs": run_sweep(client, s, sft["job_id"], train, held_out),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps, 2 LRs (CI)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "study")
    parser.add_argument("--url", help="a running service (default: start one in the work folder)")
    parser.add_argument("--token", default=os.environ.get("MINORDPO_TOKEN"))
    parser.add_argument(
        "--work", type=Path, help="model, data and service state (default: a new temp folder)"
    )
    parser.add_argument("--seeds", type=int, help="seeds per point (default: 1)")
    args = parser.parse_args()
    s = QUICK if args.quick else FULL
    if args.seeds:
        s = dataclasses.replace(s, seeds=tuple(range(args.seeds)))
    signal.signal(signal.SIGTERM, _interrupt)
    work = (args.work or Path(tempfile.mkdtemp(prefix="minordpo-study-"))).resolve()
    start = time.time()
    from minordpo_client import Client

    service = nullcontext(args.url) if args.url else running_service(work / "service", [work], s.concurrent)
    try:
        with service as url, Client(url, args.token, timeout=60) as client:
            result = study(client, s, work)
    finally:
        if args.work is None:  # a temp folder of ours: models of every job, ~77 MB each for `small`
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "command": shlex.join(["python", *sys.argv]),
        "settings": dataclasses.asdict(s),
        "wall_s": round(time.time() - start, 1),
        **result,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    agg = report.aggregate(result["jobs"])
    report.write_json(args.out, result)
    plots = report.plot(args.out, result, agg)
    report.write_markdown(args.out, result, agg, plots)
    print(f"wrote {args.out / 'results.md'} in {result['wall_s'] / 60:.1f} min")
    failed = [r["job_id"] for r in result["jobs"] if r["status"] != "succeeded"]
    if failed:
        print(f"failed jobs: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

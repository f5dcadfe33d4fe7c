"""Service latency on a warm local Ray: POST -> first training step, and per-step time of 2 Ray workers vs in-process.

Starts `minordpo serve` (its own local Ray head), submits one warm-up job so the reference cache is
warm, then times N jobs, each posted once the machine has been quiet for 5 s (the warm pool full):
POST to the first stored metric point, and the median step time from the stored points. The same
spec then runs in this process (one worker) for the baseline.
Prints `post_to_first_step_s: X` and `ray_step_over_inprocess: Y`, and, in the JSON, the machine's busy
CPU seconds from the POST to the first step (the work that start-up costs, whatever the waits).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data"


def spec(model: Path, steps: int, workers: int) -> dict[str, Any]:
    return {
        "name": "bench",
        "model": str(model),
        "dataset": {"train": str(DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"), "max_rows": 256},
        "loss": {"type": "minor_dpo", "beta": 0.1},
        "training": {"max_steps": steps, "batch_size": 8, "max_length": 512, "learning_rate": 1e-4},
        "resources": {"num_workers": workers, "cpus_per_worker": 1},
    }


def busy_cpu_s() -> float:
    """CPU seconds this machine has spent busy since boot, all processes and cores (Linux /proc/stat)."""
    from workers.warm_pool import busy_and_total_ticks

    return busy_and_total_ticks()[0] / os.sysconf("SC_CLK_TCK")


def wait_quiet(limit_s: float = 240.0, quiet_s: int = 5, busy_below: float = 0.15) -> float:
    """Wait until the machine's CPUs have been mostly idle for `quiet_s` seconds in a row (the last job's
    processes gone, the server's warm pool refilled: it starts once no job runs, and each process it
    starts imports for seconds); returns the seconds waited. Every timed job starts on a warm, quiet cluster."""
    from workers.warm_pool import idle_cores

    start = time.time()
    cores = os.cpu_count() or 1
    quiet = 0
    while time.time() - start < limit_s and quiet < quiet_s:
        quiet = quiet + 1 if 1.0 - idle_cores(1.0) / cores < busy_below else 0
    return time.time() - start


def run_job(url: str, body: dict[str, Any]) -> tuple[float, float, list[float]]:
    """Seconds from POST to the first stored step, the machine's busy CPU seconds in that time, and the
    gaps between consecutive steps. The CPU seconds are the steadier number on a shared VM: they count
    the work (process starts, imports, data, model) and not the waits for a core."""
    posted, cpu_at_post = time.time(), busy_cpu_s()
    job_id = httpx.post(f"{url}/v1/jobs", json=body, timeout=30).json()["id"]
    first = cpu = None
    while True:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
        if first is None and (job["progress"]["step"] or 0) >= 1:
            first, cpu = time.time(), busy_cpu_s() - cpu_at_post
        if job["status"] in {"succeeded", "failed", "cancelled"}:
            break
        time.sleep(0.05)
    assert job["status"] == "succeeded", job.get("error")
    rows = httpx.get(f"{url}/v1/jobs/{job_id}/metrics", params={"names": "step_time"}, timeout=10).json()[
        "data"
    ]
    assert first is not None and cpu is not None
    return first - posted, cpu, [r["step_time"] for r in rows[1:]]


def in_process_step_time(model: Path, steps: int, out: Path) -> list[float]:
    from core.reporting import NullReporter
    from core.spec import JobSpec
    from core.training import RunOptions, train

    times: list[float] = []

    class Steps(NullReporter):
        def metrics(self, step: int, values: dict[str, float]) -> None:
            if "step_time" in values and step > 1:
                times.append(values["step_time"])

    train(JobSpec.model_validate(spec(model, steps, 1)), RunOptions(output_dir=out), Steps())
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    from core.models import make_tiny_model

    root = Path(tempfile.mkdtemp(prefix="minordpo-service-bench-"))
    model = make_tiny_model(root / "model", tokenizer=DATA / "tokenizers" / "gpt2", size="tiny")
    from workers.ports import listen_ports

    port = listen_ports(1)[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINORDPO_")}
    env.update(
        MINORDPO_DATABASE_URL=f"sqlite:///{root / 'db.sqlite'}", MINORDPO_ARTIFACTS_DIR=str(root / "artifacts"),
        MINORDPO_ALLOWED_PATHS=os.pathsep.join([str(root), str(DATA)]), MINORDPO_PORT=str(port),
        MINORDPO_RAY_STATE_FILE=str(root / "ray-head.json"),
        MINORDPO_LOG_LEVEL="INFO", PYTHONPATH=str(REPO),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    log = (root / "serve.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "cli.main", "serve"], env=env, stdout=log, stderr=log)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        run_job(url, spec(model, 3, 2))  # warm-up: worker processes, imports, reference cache
        first_steps, first_cpus, ray_steps = [], [], []
        for _ in range(args.jobs):
            wait_quiet()
            first, cpu, gaps = run_job(url, spec(model, args.steps, 2))
            first_steps.append(first)
            first_cpus.append(cpu)
            ray_steps.extend(gaps)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
    local = in_process_step_time(model, args.steps, root / "local")
    result = {
        "post_to_first_step_s": statistics.median(first_steps),
        "post_to_first_step_all_s": [round(x, 2) for x in first_steps],
        "busy_cpu_s_to_first_step": statistics.median(first_cpus),
        "busy_cpu_s_to_first_step_all": [round(x, 2) for x in first_cpus],
        "ray_2_workers_step_s": statistics.median(ray_steps),
        "in_process_step_s": statistics.median(local),
    }
    print(json.dumps(result, indent=2))
    print(f"post_to_first_step_s: {result['post_to_first_step_s']:.2f}")
    print(f"ray_step_over_inprocess: {result['ray_2_workers_step_s'] / result['in_process_step_s']:.2f}")


if __name__ == "__main__":
    main()

"""What a fresh job-driver process would pay to build the trainer itself: `import ray`, then `import ray.train.torch`.

Each repeat is a new interpreter (as the Jobs API starts each job's driver): wall seconds of `import ray`
and then of `import ray.train.torch` (which brings torch). docs/architecture.md cites these numbers
for keeping the fit task (a warm process that has them imported already).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

PROBE = """
import json, time
t0 = time.perf_counter(); import ray
t1 = time.perf_counter(); import ray.train.torch
t2 = time.perf_counter()
print(json.dumps({"ray_s": t1 - t0, "ray_train_torch_s": t2 - t1}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    runs = []
    for _ in range(args.repeats):
        out = subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    for key in ("ray_s", "ray_train_torch_s"):
        values = [r[key] for r in runs]
        print(f"{key}: median {statistics.median(values):.2f} min {min(values):.2f} max {max(values):.2f}")


if __name__ == "__main__":
    main()

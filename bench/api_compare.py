"""bench/api_latency.py on two source trees side by side: the servers of `--compare-with DIR` (before) and
of this checkout (after) alternate in one invocation, on the same machine, each on freshly seeded data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from api_latency import OUT, REPO, build_parser, prepare, report, run_backend

_SEED = (
    "import json, sys; from api_latency import seed; "
    "print('SEEDED', json.dumps(seed(sys.argv[1], *map(int, sys.argv[2:]))))"
)


def seeder(tree: Path) -> Callable[[str, int, int], tuple[list[str], str]]:
    """api_latency's `seed` with `tree`'s own code in a child process: its migrations and models, so that a
    tree whose schema is older (or newer) than this checkout's gets the database its server expects."""

    def seed_in_tree(url: str, n_jobs: int, n_points: int) -> tuple[list[str], str]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(tree), str(tree / "bench")))}
        argv = [sys.executable, "-c", _SEED, url, str(n_jobs), str(n_points)]
        done = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True)
        if done.returncode != 0 or "SEEDED " not in done.stdout:
            raise RuntimeError(f"seeding with {tree} failed:\n{done.stderr[-3000:]}")
        ids, series_job = json.loads(done.stdout.rsplit("SEEDED ", 1)[1])
        return ids, series_job

    return seed_in_tree


def main() -> None:
    parser = build_parser(__doc__)
    parser.add_argument(
        "--compare-with",
        type=Path,
        required=True,
        help="the before tree, e.g. from `git archive <commit> | tar -x -C DIR` (its server runs this venv)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="before/after pairs, alternating")
    args = parser.parse_args()
    before = args.compare_with.resolve()
    if not (before / "api" / "main.py").is_file():
        parser.error(f"--compare-with {before}: not a source tree of this service (no api/main.py)")
    stamp = prepare(args)
    results = []
    for backend in (b.strip() for b in args.backends.split(",") if b.strip()):
        for round_no in range(1, args.rounds + 1):
            for label, tree in (("before", before), ("after", REPO)):
                print(f"== {backend}, round {round_no}: {label} ({tree})", flush=True)
                result = run_backend(backend, args, f"{stamp}-{label}{round_no}", tree, seeder(tree))
                result["backend"] = f"{backend} {label} {round_no}"
                results.append(result)
    report(results)
    dest = OUT / f"api-compare-{stamp}.json"
    dest.write_text(json.dumps({"args": vars(args), "results": results}, indent=2, default=str))
    print(f"\nresults: {dest}")


if __name__ == "__main__":
    main()

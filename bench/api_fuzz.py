"""Long API fuzzing run: schemathesis over every operation of a live loopback server, N requests each.

    .venv/bin/python bench/api_fuzz.py                  # 1,000 generated cases per operation
    .venv/bin/python bench/api_fuzz.py --examples 200   # shorter

The server is `minordpo serve` on its own temporary SQLite database and artifacts dir, tokens on, no
dispatcher or Ray (the API is what is fuzzed), bound to 127.0.0.1. Every case is checked against the
OpenAPI document (no 5xx, documented status, content type, headers and body schema, schema-breaking
input refused; half the cases are generated to break the schema), except "schema-valid input is accepted": the schema cannot know which paths exist.
Prints one line per operation and a total; exits 1 on any failure. The suite runs the same checks in
`tests/fuzz` with a small example budget.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fuzz.generation import configure  # noqa: E402
from workers.ports import listen_ports  # noqa: E402

TOKEN = "tok-bench-fuzz-5f1c7a"


def start_server(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = listen_ports(1)[0]
    env = {
        **os.environ,
        "MINORDPO_DATABASE_URL": f"sqlite:///{folder / 'fuzz.db'}",
        "MINORDPO_ARTIFACTS_DIR": str(folder / "artifacts"),
        "MINORDPO_API_TOKENS": f"fuzz:{TOKEN}",
        "MINORDPO_ALLOWED_PATHS": str(folder),
        "MINORDPO_EMBEDDED_DISPATCHER": "false",
        "MINORDPO_PUBLIC_DOCS": "true",
        "MINORDPO_LOG_LEVEL": "ERROR",
        "MINORDPO_PORT": str(port),
    }
    log = (folder / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve"], cwd=folder, env=env, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"server did not start; see {folder / 'server.log'}")


def fuzz_operation(
    operation: schemathesis.APIOperation, examples: int
) -> tuple[int, collections.Counter[int], list[str]]:
    statuses: collections.Counter[int] = collections.Counter()
    failures: list[str] = []

    strategy = st.one_of(*(operation.as_strategy(mode) for mode in schemathesis.GenerationMode))

    @given(case=strategy)
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case: schemathesis.Case) -> None:
        try:
            response = case.call_and_validate(
                headers={"Authorization": f"Bearer {TOKEN}"},
                excluded_checks=[schemathesis.checks.positive_data_acceptance],
                timeout=30,
            )
            statuses[response.status_code] += 1
        except (Exception, BaseExceptionGroup) as exc:  # a check failed: keep what it says and go on
            failures.append(
                " | ".join(line.strip() for line in str(exc).splitlines()[:12] if line.strip())[:400]
            )

    run()
    return sum(statuses.values()) + len(failures), statuses, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000, help="generated cases per operation")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="minordpo-fuzz-bench-"))
    proc, url = start_server(folder)
    started = time.monotonic()
    total, failed = 0, 0
    try:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        configure(schema)
        for result in schema.get_all_operations():
            operation = result.ok()
            t0 = time.monotonic()
            count, statuses, failures = fuzz_operation(operation, args.examples)
            total += count
            failed += len(failures)
            shown = ", ".join(f"{code}: {n}" for code, n in sorted(statuses.items()))
            print(f"{operation.label:45s} {count:6d} requests  {time.monotonic() - t0:6.1f} s  [{shown}]")
            for line in sorted(set(failures))[:5]:
                print(f"    FAILED {line}")
        alive = proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)
    print(
        f"total: {total} requests in {time.monotonic() - started:.0f} s, {failed} failed checks, "
        f"server {'alive' if alive else 'DIED'} at the end"
    )
    return 0 if failed == 0 and alive else 1


if __name__ == "__main__":
    raise SystemExit(main())

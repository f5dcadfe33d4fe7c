"""Temporary upload files left by a killed server are removed at start-up; live uploads are left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from api.main import create_app
from api.services.uploads import STALE_UPLOAD_S, TEMP_PREFIX, _temp_prefix
from tests.api.conftest import REPO

# A server process receiving an upload: it writes part of the body to its temporary file, then hangs.
MID_UPLOAD = """
import sys, time
from pathlib import Path
from api.services.uploads import _Sink
sink = _Sink(Path(sys.argv[1]))
sink.write(b'{"prompt": "p", "chosen": "c", "rejected": "r"}\\n' * 1000)
sink.fh.flush()
print(sink.path, flush=True)
time.sleep(600)
"""


def start(app_settings: Any) -> None:
    app = create_app(app_settings)
    with TestClient(app):
        pass
    app.state.db.dispose()


def test_a_killed_uploads_file_is_removed_at_start_up_and_live_ones_kept(
    make_settings: Any, tmp_path: Path
) -> None:
    settings = make_settings()
    folder = Path(settings.artifacts_dir).resolve() / "datasets"
    folder.mkdir(parents=True)
    child = subprocess.Popen(
        [sys.executable, "-c", MID_UPLOAD, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    killed = Path(child.stdout.readline().strip())
    assert killed.parent == folder and killed.stat().st_size > 0
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        host_prefix = _temp_prefix().rsplit("-", 2)[0]  # `.upload-<host>`
        live = folder / f"{host_prefix}-{sleeper.pid}-abc123"
        mine = folder / f"{_temp_prefix()}def456.jsonl"  # this process is alive too
        fresh_foreign = folder / f"{TEMP_PREFIX}otherhost-1-ghi789"
        stale_foreign = folder / f"{TEMP_PREFIX}otherhost-1-jkl012"
        kept_dataset = folder / ("0" * 64 + ".jsonl")
        for path in (live, mine, fresh_foreign, stale_foreign, kept_dataset):
            path.write_bytes(b"{}\n")
        old = time.time() - STALE_UPLOAD_S - 60
        os.utime(stale_foreign, (old, old))

        start(settings)

        left = {p.name for p in folder.iterdir()}
        assert left == {live.name, mine.name, fresh_foreign.name, kept_dataset.name}, left
    finally:
        sleeper.kill()
        sleeper.wait(timeout=30)

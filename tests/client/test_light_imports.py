"""The client and the remote CLI stay light: importing them loads no torch, Ray or FastAPI (README claim)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_client_and_cli_import_without_torch_ray_or_fastapi() -> None:
    code = (
        "import sys, minordpo_client, cli.main; "
        "heavy = sorted(m for m in ('torch', 'ray', 'fastapi', 'transformers') if m in sys.modules); "
        "print(','.join(heavy))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""

"""core.store exports every name it lists, and leaves Alembic unimported until a migration helper is used."""

from __future__ import annotations

import subprocess
import sys

import core.store
from tests.conftest import REPO


def test_every_listed_name_is_exported() -> None:
    missing = [name for name in core.store.__all__ if not hasattr(core.store, name)]
    assert missing == []
    from core.store import open_database
    from core.store.migrate import open_database as defined

    assert open_database is defined


def test_importing_the_store_leaves_alembic_out_until_a_migration_helper_is_asked_for() -> None:
    script = (
        "import sys, core.store\n"
        "print('alembic' in sys.modules)\n"
        "core.store.open_database\n"
        "print('alembic' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]

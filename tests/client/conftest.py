"""Client tests run against a live server (tests/live_server.py)."""

from tests.live_server import live_server, proxy  # noqa: F401 (fixtures)

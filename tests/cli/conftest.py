"""CLI tests that talk to a server use the live one of tests/live_server.py."""

from tests.live_server import live_server  # noqa: F401 (fixture)

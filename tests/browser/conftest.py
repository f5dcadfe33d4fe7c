"""Browser-test fixtures: a real uvicorn serving the API (auth on, temp SQLite), Debian's Chromium, one page."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from core.store import Database, upgrade
from tests.api.conftest import GPT2_TOKENIZER, PAIRS, REPO, write_jsonl
from tests.serving import free_port, wait_until_up

CHROMIUM = Path(os.environ.get("MINORDPO_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
TOKEN = "tok-browser-5be1c04a9d"
SCREENSHOTS: list[Path] = []  # listed in the terminal summary (visible without -s)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Name the screenshots this run wrote."""
    if SCREENSHOTS:
        terminalreporter.section("dashboard screenshots")
        for path in SCREENSHOTS:
            terminalreporter.write_line(str(path))


def _require_chromium() -> None:
    if CHROMIUM.exists():
        return
    message = f"Debian's Chromium not found at {CHROMIUM} (apt-get install -y chromium)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + ": browser tests must run in CI")
    pytest.skip(message)


@dataclass
class Server:
    """The running dashboard server, its database and where the test files live."""

    url: str
    db: Database
    root: Path
    model_dir: Path | None
    shots: Path
    shot_paths: list[Path] = field(default_factory=list)

    def screenshot(self, page: Any, name: str) -> Path:
        path = self.shots / f"{len(self.shot_paths) + 1:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        self.shot_paths.append(path)
        SCREENSHOTS.append(path)
        with (self.shots / "screenshots.txt").open("a", encoding="utf-8") as index:
            index.write(f"{path}\n")
        print(f"screenshot: {path}")
        return path


def _tokenizer_model(folder: Path) -> Path | None:
    if not GPT2_TOKENIZER.exists():
        return None
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(GPT2_TOKENIZER), eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`uvicorn api.main:create_app --factory` on a free port, tokens on, a fast SSE poller."""
    _require_chromium()
    root = tmp_path_factory.mktemp("dashboard")
    write_jsonl(root / "train.jsonl", PAIRS)
    model_dir = _tokenizer_model(root / "tokenizer-model")
    url = f"sqlite:///{root / 'dash.db'}"
    upgrade(url)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINORDPO_")}
    env.update(
        {
            "MINORDPO_DATABASE_URL": url,
            "MINORDPO_ARTIFACTS_DIR": str(root / "artifacts"),
            "MINORDPO_API_TOKENS": f"team-a:{TOKEN}",
            "MINORDPO_ALLOWED_PATHS": str(root),
            "MINORDPO_LOG_LEVEL": "WARNING",
            "MINORDPO_SSE_POLL_S": "0.2",
            "MINORDPO_SSE_HEARTBEAT_S": "5",
            "PYTHONPATH": str(REPO),
        }
    )
    cmd = [sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--host", "127.0.0.1"]
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [*cmd, "--port", str(port)], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    wait_until_up(proc, f"{base}/healthz", log=(root / "server.log").read_text, timeout_s=30, interval_s=0.1)
    shots = Path(os.environ.get("MINORDPO_SCREENSHOTS_DIR") or tempfile.mkdtemp(prefix="minordpo-dashboard-"))
    shots.mkdir(parents=True, exist_ok=True)
    db = Database(url)
    srv = Server(url=base, db=db, root=root, model_dir=model_dir, shots=shots)
    yield srv
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
    db.dispose()
    print(f"dashboard screenshots ({len(srv.shot_paths)}) in {shots} (index: {shots / 'screenshots.txt'})")


@dataclass
class Console:
    """Errors the page reported: console.error messages and uncaught exceptions.

    Chromium logs every 4xx answer to fetch() as a console error; a test that provokes one on
    purpose (a spec the API rejects) names it with `expect_error(pattern)`.
    """

    errors: list[str] = field(default_factory=list)
    expected: list[re.Pattern[str]] = field(default_factory=list)

    def expect_error(self, pattern: str) -> None:
        self.expected.append(re.compile(pattern))

    def unexpected(self, start: int) -> list[str]:
        return [e for e in self.errors[start:] if not any(p.search(e) for p in self.expected)]


@pytest.fixture(scope="session")
def browser_page(server: Server) -> Iterator[tuple[Any, Console]]:
    """One Chromium page for the whole suite (the token is entered once, in this tab's sessionStorage)."""
    from playwright.sync_api import expect, sync_playwright

    console = Console()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1366, "height": 900})
        page = context.new_page()
        page.set_default_timeout(10_000)
        page.on("console", lambda m: console.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: console.errors.append(f"pageerror: {exc}"))
        page.goto(f"{server.url}/")
        prompt = page.locator("#token-panel")
        expect(prompt).to_be_visible()
        page.get_by_label("Token", exact=True).fill(TOKEN)
        page.get_by_role("button", name="Use token").click()
        expect(prompt).to_be_hidden()
        expect(page.locator("#jobs-table")).to_be_visible()
        assert not console.errors, f"browser console errors while signing in: {console.errors}"
        yield page, console
        context.close()
        browser.close()


@pytest.fixture
def console(browser_page: tuple[Any, Console]) -> Console:
    """The shared page's console record."""
    return browser_page[1]


@pytest.fixture
def page(browser_page: tuple[Any, Console]) -> Iterator[Any]:
    """The shared page; the test fails if the browser console reported an unexpected error during it."""
    pg, console = browser_page
    start = len(console.errors)
    yield pg
    new = console.unexpected(start)
    console.expected.clear()
    assert not new, "browser console errors:\n" + "\n".join(new)


def spec(name: str, loss: str, lr: float, root: Path) -> dict[str, Any]:
    """A stored job spec (jobs written straight through core.store, not via the API)."""
    return json.loads(
        json.dumps(
            {
                "name": name,
                "model": {"path": str(root / "tokenizer-model")},
                "dataset": {"train": str(root / "train.jsonl")},
                "loss": {"type": loss, "beta": 0.1},
                "training": {"max_steps": 20, "learning_rate": lr, "batch_size": 2},
            }
        )
    )

"""Fixtures for the API tests: a migrated tmp SQLite database, settings with tokens, the app and a client."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.main import create_app
from core.settings import Settings
from core.store import Database, upgrade

REPO = Path(__file__).resolve().parents[2]
GPT2_TOKENIZER = REPO / "examples" / "data" / "tokenizers" / "gpt2" / "tokenizer.json"

TOKENS = {"team-a": "tok-a-3f9c2e7d51", "team-b": "tok-b-8a1d4c6e02", "*": "tok-admin-77c0e1b9"}
PAIRS = [
    {"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f" It is {2 * i}.", "rejected": " No idea."}
    for i in range(12)
]


def auth(project: str = "team-a") -> dict[str, str]:
    """Authorization header for a project's token."""
    return {"Authorization": f"Bearer {TOKENS[project]}"}


def write_jsonl(path: Path, rows: list[Any], extra_lines: list[str] | None = None) -> Path:
    """Write rows as JSONL (plus raw lines, e.g. broken JSON)."""
    lines = [json.dumps(r) for r in rows] + list(extra_lines or [])
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def roots(tmp_path: Path) -> Path:
    """The single allowed root of these tests (models and data live under it)."""
    root = tmp_path / "root"
    (root / "models" / "empty").mkdir(parents=True)
    write_jsonl(root / "train.jsonl", PAIRS)
    return root


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """A fresh SQLite database migrated to head through core.store."""
    url = f"sqlite:///{tmp_path / 'api.db'}"
    upgrade(url)
    return url


@pytest.fixture
def make_settings(tmp_path: Path, db_url: str, roots: Path) -> Callable[..., Settings]:
    """Settings for a test app (tokens on by default); keyword arguments override fields."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": db_url,
            "artifacts_dir": tmp_path / "artifacts",
            "api_tokens": ",".join(f"{p}:{t}" for p, t in TOKENS.items()),
            "allowed_paths": f"{roots}:{tmp_path / 'artifacts'}",
            "host": "127.0.0.1",
            "log_json": True,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    """Default test settings: three tokens (team-a, team-b, admin)."""
    return make_settings()


@pytest.fixture
def app(settings: Settings) -> Iterator[FastAPI]:
    """The app under test."""
    application = create_app(settings)
    yield application
    application.state.db.dispose()


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    """A TestClient (lifespan run) against the app."""
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def db(app: FastAPI) -> Database:
    """The app's database, for arranging state (metrics, checkpoints, status changes)."""
    return app.state.db


@pytest.fixture
def spec(roots: Path) -> dict[str, Any]:
    """A minimal valid job spec whose paths lie under the allowed root."""
    return {
        "name": "unit-job",
        "model": str(roots / "models" / "empty"),
        "dataset": {"train": str(roots / "train.jsonl")},
        "training": {"max_steps": 5, "batch_size": 2, "max_length": 64},
    }


def save_gpt2_tokenizer(folder: Path, chat_template: str | None = None) -> Path:
    """Save the shipped GPT-2 tokenizer (optionally with a chat template) as a folder AutoTokenizer loads."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(GPT2_TOKENIZER), eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding only the GPT-2 tokenizer (enough for /v1/jobs:validate)."""
    return save_gpt2_tokenizer(tmp_path_factory.mktemp("tokenizer-model"))


@contextlib.contextmanager
def closed_hub_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The hub client online and pointed at a bound, never-listening loopback port; yields its URL."""
    import huggingface_hub.constants as hub

    with socket.socket() as sock:  # bound, never listening: a connection is refused
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MINORDPO_HUB_OFFLINE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub, "ENDPOINT", endpoint)
        yield endpoint


@pytest.fixture
def pg_client(make_settings: Callable[..., Settings]) -> Iterator[tuple[TestClient, Any]]:
    """An API on a fresh, migrated PostgreSQL database (tests marked `postgres`), with its store."""
    from tests.store.conftest import temporary_pg_database

    with temporary_pg_database() as url:
        upgrade(url)
        app = create_app(make_settings(database_url=url))
        with TestClient(app) as client:
            yield client, app.state.db
        app.state.db.dispose()

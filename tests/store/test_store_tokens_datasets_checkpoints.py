"""API tokens (hashed, synced, revoked), content-addressed datasets, idempotent checkpoints."""

from __future__ import annotations

import hashlib
import threading

import pytest
from sqlalchemy import select

from core.store import (
    ADMIN_PROJECT,
    ApiToken,
    Database,
    NotFoundError,
    add_checkpoint,
    create_job,
    delete_checkpoint,
    ensure_project,
    get_dataset,
    hash_token,
    latest_checkpoint,
    list_checkpoints,
    list_datasets,
    list_events,
    list_projects,
    parse_token_entries,
    project_for_token,
    register_dataset,
    sync_tokens,
)


def test_tokens_are_stored_hashed_and_resolve_to_projects(db: Database) -> None:
    with db.write() as s:
        assert sync_tokens(s, [("team-a", "secret-a"), ("team-b", "secret-b"), (ADMIN_PROJECT, "root")]) == 3
    with db.read() as s:
        rows = list(s.scalars(select(ApiToken)))
        assert {r.token_hash for r in rows} == {hash_token(t) for t in ("secret-a", "secret-b", "root")}
        assert all("secret" not in (r.token_hash + (r.label or "")) for r in rows)
        assert hash_token("secret-a") == hashlib.sha256(b"secret-a").hexdigest()
        assert project_for_token(s, "secret-a") == "team-a"
        assert project_for_token(s, "root") == "*"
        assert project_for_token(s, "wrong") is None and project_for_token(s, "") is None
        assert {"team-a", "team-b", "*"} <= set(list_projects(s))


def test_sync_revokes_removed_tokens_and_moves_changed_ones(db: Database) -> None:
    with db.write() as s:
        sync_tokens(s, [("a", "t1"), ("b", "t2")])
    with db.write() as s:
        sync_tokens(s, [("c", "t2"), ("a", "t3")])  # t1 revoked, t2 moved to c, t3 new
    with db.read() as s:
        assert project_for_token(s, "t1") is None
        assert project_for_token(s, "t2") == "c"
        assert project_for_token(s, "t3") == "a"
    with db.write() as s:
        with pytest.raises(ValueError, match="two projects"):
            sync_tokens(s, [("a", "same"), ("b", "same")])
        with pytest.raises(ValueError):
            sync_tokens(s, [("bad project!", "x")])
        with pytest.raises(ValueError):
            sync_tokens(s, [("a", "")])


def test_parse_token_entries() -> None:
    assert parse_token_entries("a:t1, *:root\n# comment\n\nb:t:with:colons") == [
        ("a", "t1"),
        ("*", "root"),
        ("b", "t:with:colons"),
    ]
    for bad in ("just-a-token", ":t", "a:"):
        with pytest.raises(ValueError):
            parse_token_entries(bad)


def test_datasets_are_content_addressed_per_project(db: Database) -> None:
    digest = hashlib.sha256(b"rows").hexdigest()
    with db.write() as s:
        first, created = register_dataset(
            s,
            project="a",
            sha256=digest,
            filename="x.jsonl",
            path="/d/x",
            size=4,
            format="jsonl",
            report={"rows": 1},
        )
        again, created_again = register_dataset(
            s, project="a", sha256=digest, filename="y.jsonl", path="/d/y", size=4, format="jsonl"
        )
        other, created_other = register_dataset(
            s, project="b", sha256=digest, filename="z.jsonl", path="/d/z", size=4, format="jsonl"
        )
    assert created and not created_again and created_other
    assert first.id == again.id == other.id == "ds_" + digest[:32]
    assert again.filename == "x.jsonl" and again.report == {"rows": 1}
    with db.read() as s:
        assert get_dataset(s, first.id, project="a").path == "/d/x"
        assert get_dataset(s, first.id, project="c") is None
        assert get_dataset(s, first.id) is not None
        assert [d.project for d in list_datasets(s, project="b")] == ["b"]
    with db.write() as s, pytest.raises(ValueError):
        register_dataset(s, project="a", sha256="nothex", filename="f", path="p", size=1, format="jsonl")


def test_checkpoints_are_idempotent_per_step(db: Database) -> None:
    with db.write() as s:
        job, _ = create_job(s, project="p", spec={"name": "c"})
    with db.write() as s:
        ckpt, created = add_checkpoint(s, job.id, 100, "/a/100", {"loss": 0.5})
        assert created and ckpt.path == "/a/100"
        same, created = add_checkpoint(s, job.id, 100, "/a/100", {"loss": 0.5})
        assert not created and same.path == "/a/100"
        moved, created = add_checkpoint(s, job.id, 100, "/b/100")  # a retry saved it elsewhere
        assert not created and moved.path == "/b/100" and moved.metrics == {"loss": 0.5}
        add_checkpoint(s, job.id, 50, "/a/50")
    with db.read() as s:
        assert [(c.step, c.path) for c in list_checkpoints(s, job.id)] == [(50, "/a/50"), (100, "/b/100")]
        assert latest_checkpoint(s, job.id).step == 100
        assert [e.dedup_key for e in list_events(s, job.id) if e.kind == "checkpoint"] == [
            "checkpoint:100",
            "checkpoint:50",
        ]
    with db.write() as s:
        assert delete_checkpoint(s, job.id, 50) and not delete_checkpoint(s, job.id, 50)
        with pytest.raises(NotFoundError):
            add_checkpoint(s, "job_missing", 1, "/x")


def test_two_replicas_syncing_the_same_tokens_at_once_both_succeed(db: Database) -> None:
    """Two API replicas starting together (two sessions here): the second sync waits, then must not hit a duplicate key."""
    entries = [("team-a", "secret-a"), ("team-b", "secret-b")]
    outcome: list[BaseException | int] = []
    with db.write() as s:  # the projects exist already: only the token rows can collide
        ensure_project(s, "team-a")
        ensure_project(s, "team-b")

    def second() -> None:
        try:
            with db.write() as s:
                outcome.append(sync_tokens(s, entries))
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome.append(exc)

    with db.write() as s:
        sync_tokens(s, entries)  # inserted, not yet committed
        other = threading.Thread(target=second)
        other.start()
        other.join(0.5)  # blocked on our transaction (a row lock on PostgreSQL, BEGIN IMMEDIATE on SQLite)
    other.join(30)
    assert outcome == [2]
    with db.read() as s:
        assert project_for_token(s, "secret-b") == "team-b"

"""The model fingerprint behind the reference cache: a hub id is keyed by the commit its revision names."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.models import hub_commit, model_fingerprint
from core.spec import ModelSpec

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def fake_hub_cache(root: Path, repo_id: str, refs: dict[str, str]) -> Path:
    """A folder laid out like Hugging Face's hub cache: ``models--owner--name/refs/<ref>`` + ``snapshots/<hash>``."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    for ref, commit in refs.items():
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    return root


def test_hub_revision_resolves_to_its_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = fake_hub_cache(tmp_path, "owner/name", {"main": COMMIT_A, "v1": COMMIT_B})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert hub_commit("owner/name", None) == COMMIT_A
    assert hub_commit("owner/name", "v1") == COMMIT_B
    assert hub_commit("owner/name", COMMIT_B) == COMMIT_B  # a hash is its own commit
    assert hub_commit("owner/name", "missing-branch") is None
    assert hub_commit("other/name", None) is None


def test_two_commits_give_two_keys_and_one_commit_one_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = fake_hub_cache(tmp_path, "owner/name", {"main": COMMIT_A})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    at_a = model_fingerprint(ModelSpec(path="owner/name"))
    assert model_fingerprint(ModelSpec(path="owner/name", revision=COMMIT_A)) == at_a  # main *is* commit A
    (cache / "models--owner--name" / "refs" / "main").write_text(COMMIT_B)  # main moved on
    at_b = model_fingerprint(ModelSpec(path="owner/name"))
    assert at_b != at_a
    assert model_fingerprint(ModelSpec(path="owner/name", revision=COMMIT_B)) == at_b


def test_uncached_hub_id_is_keyed_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    spec = ModelSpec(path="owner/name")
    by_name = model_fingerprint(spec)
    assert by_name == model_fingerprint(ModelSpec(path="owner/name", revision="main"))
    assert by_name != model_fingerprint(ModelSpec(path="owner/other"))
    fake_hub_cache(tmp_path, "owner/name", {"main": COMMIT_A})
    assert model_fingerprint(spec) != by_name  # once downloaded, the commit keys it


def test_local_folder_is_keyed_by_its_bytes(tiny_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))
    assert model_fingerprint(ModelSpec(path=str(copy))) == model_fingerprint(
        ModelSpec(path=str(tiny_model_dir))
    )
    config = copy / "config.json"
    config.write_text(config.read_text().replace("}", ', "note": 1}', 1))
    assert model_fingerprint(ModelSpec(path=str(copy))) != model_fingerprint(
        ModelSpec(path=str(tiny_model_dir))
    )


def test_weight_files_are_hashed_in_parallel_and_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib
    import os
    import threading

    from core import file_digests as digests

    files = [tmp_path / f"model-{i:05d}.safetensors" for i in range(5)]
    for i, file in enumerate(files):
        file.write_bytes(os.urandom(1000 + i))
    reads: list[str] = []
    lock = threading.Lock()
    together = threading.Barrier(2, timeout=10)  # the first two hashes must run at the same time
    last_done = threading.Event()
    real = hashlib.file_digest

    def counted(fh, name):  # type: ignore[no-untyped-def]
        with lock:  # this call's place among the hashes, taken atomically
            reads.append(fh.name)
            place = len(reads)
        if place <= 2:
            together.wait()  # sequential hashing would break the barrier here
        if fh.name == str(files[0]):  # the first file finishes after the last one: out of order
            assert last_done.wait(10)
        digest = real(fh, name)
        if fh.name == str(files[-1]):
            last_done.set()
        return digest

    monkeypatch.setattr(digests.hashlib, "file_digest", counted)
    expected = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    assert digests.file_digests(files) == expected  # in order, whatever thread finished first
    assert sorted(reads) == sorted(str(f) for f in files)
    files[2].write_bytes(b"new weights")
    reads.clear()
    together.reset()
    changed = digests.file_digests(files)
    assert changed[2] == hashlib.sha256(b"new weights").hexdigest() and changed[:2] == expected[:2]

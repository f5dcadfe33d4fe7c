"""The repository stands alone: no file in it refers to a path outside it, and the data it needs ships in it."""

from __future__ import annotations

import gzip
import json
import subprocess

from tests.conftest import DATA, GPT2_FILE, HH_FILE, REPO

#: Spelled in pieces so that this file does not match itself.
OUTSIDE = ("../" + "shared", "shared" + "/data/", "ALGORITHMS" + ".md", "NOTES-RAY" + ".md")


def repository_files() -> list[str]:
    """Tracked and new (not ignored) files: what a clone of this checkout would hold."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [name for name in out.split("\0") if name and (REPO / name).is_file()]


def test_no_file_refers_to_a_path_outside_the_repository() -> None:
    offenders = []
    for name in repository_files():
        data = (REPO / name).read_bytes()
        if b"\0" in data[:8192]:  # binary (gzip, images)
            continue
        text = data.decode("utf-8", errors="replace")
        for needle in OUTSIDE:
            if needle in text:
                line = text[: text.index(needle)].count("\n") + 1
                offenders.append(f"{name}:{line}: {needle}")
    assert not offenders, "\n".join(offenders)


def test_the_shipped_data_is_there_with_its_provenance() -> None:
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    assert len(rows) == 2312 and set(rows[0]) == {"chosen", "rejected"}
    vocab = json.loads(GPT2_FILE.read_text(encoding="utf-8"))["model"]["vocab"]
    assert len(vocab) == 50257 and vocab["<|endoftext|>"] == 50256
    sources = (DATA / "SOURCES.md").read_text(encoding="utf-8")
    for shipped in (HH_FILE, GPT2_FILE):
        assert str(shipped.relative_to(DATA)) in sources
    assert sources.count("MIT") >= 2

"""A malformed-dataset corpus, each kind refused with its own status and line at upload and at :validate."""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.main import create_app
from core.store import Dataset
from tests.api.conftest import PAIRS, auth, save_gpt2_tokenizer

GOOD = "".join(json.dumps(r) + "\n" for r in PAIRS).encode()
LIMITS = {"max_line_bytes": 64 * 1024, "max_dataset_bytes": 1024 * 1024, "max_json_bytes": 64 * 1024}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
USER = [{"role": "user", "content": "What is 2 + 2?"}]
CHAT_ROW = {
    "prompt": USER,
    "chosen": [{"role": "assistant", "content": "4"}],
    "rejected": [{"role": "assistant", "content": "5"}],
}


def jsonl(*rows: Any) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def parquet(rows: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


@dataclass(frozen=True)
class Case:
    """One malformed file: how to make it, and the status, message and place both endpoints must give."""

    filename: str
    make: Callable[[], bytes]
    status: int
    message: str
    loc: str  # "line N" (or "body" for a fault of the whole file) in the upload's errors
    validate_message: str | None = None  # where :validate words it differently


CORPUS = {
    "deeply_nested_json": Case("deep.jsonl", lambda: b"[" * 50_000 + b"\n", 422,
                               "nested deeper than 100 levels", "line 1"),
    "openai_without_preferred_output": Case("openai.jsonl", lambda: jsonl(
        {"input": {"messages": USER}, "non_preferred_output": [{"role": "assistant", "content": "5"}]}),
        422, "missing field 'preferred_output'", "line 1"),
    "conversational_unknown_role": Case("wizard.jsonl", lambda: jsonl(
        {**CHAT_ROW, "prompt": [{"role": "wizard", "content": "Cast a spell"}]}), 422, "role 'wizard'", "line 1"),
    "non_string_content": Case("content.jsonl", lambda: jsonl(
        {**CHAT_ROW, "chosen": [{"role": "assistant", "content": 4}]}), 422, "content is not a string", "line 1"),
    "over_long_line": Case("long.jsonl", lambda: GOOD[:200].split(b"\n")[0] + b"\n"
                           + jsonl({**PAIRS[0], "prompt": "x" * 100_000}), 422,
                           "line is longer than 65536 bytes", "line 2"),
    "decompression_bomb_one_line": Case("bomb.jsonl.gz", lambda: gzip.compress(
        b'{"prompt": "' + b"a" * 16_000_000 + b'"}\n'), 422, "line is longer than 65536 bytes", "line 1"),
    "decompression_bomb_many_lines": Case("bomb.jsonl.gz", lambda: gzip.compress(GOOD * 20_000), 413,
                                          "larger than 1048576 bytes once decompressed", "body"),
    "truncated_gzip": Case("cut.jsonl.gz", lambda: (lambda z: z[: len(z) // 2])(gzip.compress(GOOD * 20)), 422,
                           "Compressed file ended before the end-of-stream marker", "body"),
    "latin1_encoding": Case("latin1.jsonl", lambda: json.dumps(
        {"prompt": "Café?", "chosen": " Oui", "rejected": " Non"}, ensure_ascii=False).encode("latin-1"),
        422, "not valid UTF-8 at byte", "line 1"),
    "utf16_encoding": Case("utf16.jsonl", lambda: GOOD.decode().encode("utf-16"), 422,
                           "the file is UTF-16 encoded", "line 1"),
    "parquet_wrong_columns": Case("cols.parquet", lambda: parquet([{"question": "q", "answer": "a"}]), 422,
                                  "no preference fields (found: answer, question)", "line 1"),
    "empty_file": Case("empty.jsonl", lambda: b"", 422, "The upload is empty", "body",
                       validate_message="the file has no rows"),
    "invalid_json_line": Case("broken.jsonl", lambda: b'{"prompt": "p", "chosen": \n', 422, "invalid JSON",
                              "line 1"),
    "non_object_row": Case("array.jsonl", lambda: b'["p", "c", "r"]\n', 422, "row is a JSON array", "line 1"),
    "json_not_a_list": Case("object.json", lambda: b'{"rows": []}', 422, "must be a list of rows", "body"),
    "json_over_its_limit": Case("big.json", lambda: json.dumps(PAIRS * 100).encode(), 413,
                                "larger than 65536 bytes", "body"),
}  # fmt: skip


@pytest.fixture(scope="module")
def chat_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the GPT-2 tokenizer with a chat template (chat rows validate for real)."""
    return save_gpt2_tokenizer(tmp_path_factory.mktemp("chat-tokenizer"), CHAT_TEMPLATE)


@pytest.fixture
def limited(make_settings: Any, roots: Path, chat_tokenizer_dir: Path) -> Iterator[TestClient]:
    """An app with small dataset limits, so bombs and long lines stay quick to make."""
    app = create_app(make_settings(allowed_paths=f"{roots}:{chat_tokenizer_dir}", **LIMITS))
    with TestClient(app) as client:
        yield client
    app.state.db.dispose()


def stored(client: TestClient, artifacts_dir: Path) -> tuple[list[str], int]:
    """The files in the datasets folder (temporary ones included) and the dataset rows in the database."""
    folder = artifacts_dir / "datasets"
    files = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    with client.app.state.db.read() as session:  # type: ignore[attr-defined]
        rows = session.scalar(select(func.count()).select_from(Dataset))
    return files, int(rows or 0)


def upload(client: TestClient, name: str, data: bytes) -> Any:
    return client.post("/v1/datasets", files={"file": (name, io.BytesIO(data))}, headers=auth())


def validate(client: TestClient, spec: dict[str, Any], model: Path, data: Path) -> Any:
    body = {**spec, "model": str(model), "dataset": {"train": str(data)}}
    return client.post("/v1/jobs:validate", json=body, headers=auth())


@pytest.mark.parametrize("kind", sorted(CORPUS))
def test_each_malformed_file_is_refused_alike_at_upload_and_validate_leaving_nothing(
    kind: str,
    limited: TestClient,
    tmp_path: Path,
    roots: Path,
    spec: dict[str, Any],
    chat_tokenizer_dir: Path,
) -> None:
    case = CORPUS[kind]
    data = case.make()

    r = upload(limited, case.filename, data)
    assert r.status_code == case.status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert case.message in body["detail"] and body["errors"][0]["loc"] == case.loc, body
    if case.loc != "body":
        assert case.loc in body["detail"]
    assert stored(limited, tmp_path / "artifacts") == ([], 0)

    path = roots / case.filename
    path.write_bytes(data)
    r = validate(limited, spec, chat_tokenizer_dir, path)
    assert r.status_code == case.status, r.text
    detail = r.json()["detail"]
    assert (case.validate_message or case.message) in detail and r.json()["errors"][0][
        "loc"
    ] == "dataset.train"
    if case.loc != "body":
        assert case.loc in detail
    assert stored(limited, tmp_path / "artifacts") == ([], 0)


def test_upload_and_validate_skip_the_same_chat_rows(
    limited: TestClient, roots: Path, spec: dict[str, Any], chat_tokenizer_dir: Path
) -> None:
    rows = [
        CHAT_ROW,
        {"input": {"messages": USER}, "non_preferred_output": CHAT_ROW["rejected"]},
        {**CHAT_ROW, "prompt": [{"role": "wizard", "content": "Cast a spell"}]},
        {**CHAT_ROW, "chosen": [{"role": "assistant", "content": ["4"]}]},
        {**CHAT_ROW, "chosen": [{"role": None, "content": "4"}]},
        {**CHAT_ROW, "rejected": CHAT_ROW["chosen"]},
        {**CHAT_ROW, "chosen": [{"role": "assistant", "content": "four"}]},
    ]
    data = jsonl(*rows) + b"[" * 5000 + b"\n"
    r = upload(limited, "mixed.jsonl", data)
    assert r.status_code == 201, r.text
    report = r.json()["report"]
    path = roots / "mixed.jsonl"
    path.write_bytes(data)
    r = validate(limited, spec, chat_tokenizer_dir, path)
    assert r.status_code == 200, r.text
    checked = r.json()["dataset"]
    assert report["rows_valid"] == checked["rows_used"] == 2
    assert (
        [e["line"] for e in report["errors"]] == [s["line"] for s in checked["skipped"]] == [2, 3, 4, 5, 6, 8]
    )
    assert [e["msg"] for e in report["errors"]] == [s["reason"] for s in checked["skipped"]]


def test_a_byte_order_mark_is_tolerated_on_the_first_line_only(
    limited: TestClient, roots: Path, spec: dict[str, Any], chat_tokenizer_dir: Path
) -> None:
    data = b"\xef\xbb\xbf" + GOOD + b"\xef\xbb\xbf" + GOOD.split(b"\n")[0] + b"\n"
    r = upload(limited, "bom.jsonl", data)
    assert r.status_code == 201, r.text
    report = r.json()["report"]
    assert report["rows_valid"] == len(PAIRS) and [e["line"] for e in report["errors"]] == [len(PAIRS) + 1]
    assert "BOM" in report["errors"][0]["msg"]
    path = roots / "bom.jsonl"
    path.write_bytes(data)
    r = validate(limited, spec, chat_tokenizer_dir, path)
    assert r.status_code == 200 and r.json()["dataset"]["rows_used"] == len(PAIRS), r.text


def test_the_issue_row_of_nested_brackets_is_a_422_on_line_1_under_default_limits(client: TestClient) -> None:
    r = client.post("/v1/datasets", content=b"[" * 100_000, headers=auth())  # sniffed as a .json file
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["loc"] == "line 1" and "nested deeper than 100 levels" in r.json()["detail"]

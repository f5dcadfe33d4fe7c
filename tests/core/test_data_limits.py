"""Dataset input limits (nesting, line length, decompressed and .json size) and the tokenizer-free row checks."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from core.data import DatasetError, RowError, normalise, prepare_data, read_rows
from core.data.errors import INVALID_JSON, LINE_TOO_LONG, TOO_LARGE
from core.data.formats import ChatPair, check_row
from core.data.limits import DataLimits, json_depth, too_deep_line
from core.spec import DatasetSpec

PAIR = {"prompt": "Question?", "chosen": " yes", "rejected": " no"}
GOOD_LINE = json.dumps(PAIR)
DEEP_LINE = "[" * 100_000  # the row: json.loads alone raises RecursionError on it


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_depth_counts_brackets_outside_strings_only() -> None:
    assert json_depth(b"[" * 500 + b"]" * 500, 100) == 500
    assert json_depth(b"[[[]]]", 100) <= 3
    quoted = json.dumps({"prompt": "[" * 300 + '\\"[{', "chosen": "{" * 300, "rejected": "]"}).encode()
    assert json_depth(quoted, 100) == 1
    assert json_depth(b"[" + b"[]," * 1000 + b"[]]", 100) == 2
    assert too_deep_line(b'[\n{"a": [1]},\n' + b"[" * 200 + b"\n", 102) == 3
    assert too_deep_line(b"[[1]]\n", 100) is None


def test_a_deeply_nested_line_is_a_bad_row_naming_its_line(tmp_path: Path) -> None:
    path = write(tmp_path / "deep.jsonl", f"{GOOD_LINE}\n{DEEP_LINE}\n{'[' * 101}1{']' * 101}\n{GOOD_LINE}\n")
    rows = list(read_rows(path))
    assert [line for line, _ in rows] == [1, 2, 3, 4]
    for line in (2, 3):
        error = dict(rows)[line]
        assert isinstance(error, RowError) and error.kind == INVALID_JSON
        assert "nested deeper than 100 levels" in error.reason
    assert dict(rows)[4] == PAIR
    shallow = write(tmp_path / "shallow.jsonl", json.dumps({**PAIR, "meta": [[[[1]]]]}) + "\n")
    assert isinstance(list(read_rows(shallow, DataLimits(max_json_depth=5)))[0][1], dict)
    assert isinstance(list(read_rows(shallow, DataLimits(max_json_depth=4)))[0][1], RowError)


def test_deep_json_files_name_the_line(tmp_path: Path) -> None:
    whole = write(tmp_path / "deep.json", f"[\n{GOOD_LINE},\n{DEEP_LINE}\n")
    with pytest.raises(DatasetError, match="nested deeper than 100 levels") as err:
        list(read_rows(whole))
    assert err.value.line == 3


def test_a_line_over_the_limit_fails_naming_it_without_reading_it_whole(tmp_path: Path) -> None:
    limits = DataLimits(max_line_bytes=1000)
    path = write(tmp_path / "long.jsonl", f"{GOOD_LINE}\n{json.dumps({**PAIR, 'prompt': 'x' * 5000})}\n")
    with pytest.raises(DatasetError, match="longer than 1000 bytes") as err:
        list(read_rows(path, limits))
    assert (err.value.line, err.value.kind) == (2, LINE_TOO_LONG)
    exact = write(tmp_path / "exact.jsonl", f"{GOOD_LINE}\n" * 3)
    assert len(list(read_rows(exact, DataLimits(max_line_bytes=len(GOOD_LINE))))) == 3


def test_decompressed_size_is_counted_while_reading(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.jsonl.gz"
    bomb.write_bytes(gzip.compress((GOOD_LINE + "\n").encode() * 20_000))  # ~1 MB from a few KB
    assert bomb.stat().st_size < 20_000
    with pytest.raises(DatasetError, match="larger than 100000 bytes once decompressed") as err:
        list(read_rows(bomb, DataLimits(max_dataset_bytes=100_000)))
    assert err.value.kind == TOO_LARGE
    one_line = tmp_path / "line.jsonl.gz"
    one_line.write_bytes(gzip.compress(b'{"prompt": "' + b"a" * 2_000_000 + b'"}'))
    with pytest.raises(DatasetError, match="longer than") as err:
        list(read_rows(one_line, DataLimits(max_line_bytes=10_000)))
    assert (err.value.line, err.value.kind) == (1, LINE_TOO_LONG)


def test_whole_json_files_are_bounded_but_json_lines_named_json_are_streamed(tmp_path: Path) -> None:
    array = write(tmp_path / "rows.json", json.dumps([PAIR] * 200))
    with pytest.raises(DatasetError, match="larger than 1000 bytes") as err:
        list(read_rows(array, DataLimits(max_json_bytes=1000)))
    assert err.value.kind == TOO_LARGE
    lines = write(tmp_path / "lines.json", f"{GOOD_LINE}\n" * 200)
    assert len(list(read_rows(lines, DataLimits(max_json_bytes=1000)))) == 200


def test_parquet_over_the_decompressed_limit_is_refused(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "big.parquet"
    pq.write_table(pa.Table.from_pylist([{**PAIR, "prompt": "q" * 1000 + str(i)} for i in range(200)]), path)
    assert len(list(read_rows(path))) == 200
    with pytest.raises(DatasetError, match="larger than 50000 bytes") as err:
        list(read_rows(path, DataLimits(max_dataset_bytes=50_000)))
    assert err.value.kind == TOO_LARGE


def test_utf16_files_are_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "utf16.jsonl"
    path.write_bytes((GOOD_LINE + "\n").encode("utf-16"))
    with pytest.raises(DatasetError, match="UTF-16") as err:
        list(read_rows(path))
    assert err.value.line == 1


CHAT = [{"role": "user", "content": "2 + 2?"}]
BAD_CHAT_ROWS: list[tuple[dict[str, Any], str]] = [
    ({"input": {"messages": CHAT}, "non_preferred_output": [{"role": "assistant", "content": "5"}]},
     "missing field 'preferred_output'"),
    ({"prompt": [{"role": "wizard", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "role 'wizard'"),
    ({"prompt": CHAT, "chosen": [{"role": "assistant", "content": 4}],
      "rejected": [{"role": "assistant", "content": "5"}]}, "content is not a string"),
    ({"prompt": CHAT, "chosen": [{"role": 7, "content": "4"}],
      "rejected": [{"role": "assistant", "content": "5"}]}, "is not a {role, content} object"),
    ({"prompt": CHAT, "chosen": [{"role": "assistant", "content": "4"}],
      "rejected": [{"role": "assistant", "content": "4"}]}, "identical"),
]  # fmt: skip


@pytest.mark.parametrize(("row", "reason"), BAD_CHAT_ROWS)
def test_chat_rows_fail_the_same_check_with_and_without_a_tokenizer(
    row: dict[str, Any], reason: str, chat_tokenizer: Any
) -> None:
    with pytest.raises(RowError, match=reason.replace("{", r"\{").replace("}", r"\}")) as loop:
        normalise(row, "auto", chat_tokenizer)
    with pytest.raises(RowError) as upload:
        check_row(row)
    assert upload.value == loop.value


def test_good_chat_rows_pass_without_a_tokenizer_and_render_with_one(chat_tokenizer: Any) -> None:
    row = {"prompt": CHAT, "chosen": [{"role": "assistant", "content": "4"}],
           "rejected": [{"role": "assistant", "content": "5"}]}  # fmt: skip
    fmt, checked = check_row(row)
    assert fmt == "conversational" and isinstance(checked, ChatPair) and checked.prompt == CHAT
    text = normalise(row, "auto", chat_tokenizer)
    assert text.chosen.startswith("4") and text.rejected.startswith("5")


def test_prepare_turns_a_deeply_nested_file_into_a_dataset_error(tmp_path: Path, gpt2_tokenizer: Any) -> None:
    path = write(tmp_path / "deep.jsonl", DEEP_LINE + "\n")
    spec = DatasetSpec(train=str(path))
    with pytest.raises(DatasetError, match="line 1: invalid JSON: nested deeper than 100 levels"):
        prepare_data(spec, gpt2_tokenizer, 64, 0)

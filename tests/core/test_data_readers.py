"""read_rows: every supported file type, row numbering, and unreadable inputs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from core.data import DatasetError, RowError, read_rows


def _rows(path: Path) -> list[tuple[int, dict | RowError]]:
    return list(read_rows(path))


def _standard_rows(data_fixtures_dir: Path) -> list[dict]:
    with (data_fixtures_dir / "standard.jsonl").open() as fh:
        return [json.loads(line) for line in fh]


def test_jsonl_rows_numbered_by_physical_line(data_fixtures_dir: Path) -> None:
    rows = _rows(data_fixtures_dir / "bad_rows.jsonl")
    lines = [line for line, _ in rows]
    assert lines == [1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12]  # line 5 is blank: not a row, still counted
    by_line = dict(rows)
    assert by_line[1] == {
        "prompt": "What is the capital of Australia?",
        "chosen": " Canberra.",
        "rejected": " Sydney.",
    }
    assert isinstance(by_line[2], RowError) and by_line[2].kind == "invalid_json"
    assert isinstance(by_line[11], RowError) and by_line[11].kind == "wrong_shape"
    assert "array" in by_line[11].reason


def test_jsonl_gz_and_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n\xff\xfe\n')
    rows = _rows(path)
    assert rows[0] == (1, {"prompt": "a", "chosen": "b", "rejected": "c"})
    assert rows[1][0] == 2 and isinstance(rows[1][1], RowError) and "UTF-8" in rows[1][1].reason


def test_jsonl_byte_order_mark_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"chosen": "a"}\n{"chosen": "b"}\n')
    assert _rows(path) == [(1, {"chosen": "a"}), (2, {"chosen": "b"})]


def test_json_list_and_data_object(tmp_path: Path, data_fixtures_dir: Path) -> None:
    conv = _rows(data_fixtures_dir / "conversational.json")
    assert [line for line, _ in conv] == [1, 2, 3, 4]
    assert conv[1][1]["prompt"][0] == {"role": "system", "content": "You are a concise assistant."}
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [{"chosen": "x"}, "not a row"]}))
    rows = _rows(wrapped)
    assert rows[0] == (1, {"chosen": "x"})
    assert rows[1][0] == 2 and isinstance(rows[1][1], RowError)


def test_json_file_holding_json_lines_is_read_line_by_line(tmp_path: Path) -> None:
    path = tmp_path / "lines.json"
    path.write_text('{"chosen": "a"}\n{"chosen": "b"}\n')
    assert _rows(path) == [(1, {"chosen": "a"}), (2, {"chosen": "b"})]


def test_broken_json_file_names_path_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"chosen": "a"},\n  {"chosen": \n]')
    with pytest.raises(DatasetError) as info:
        _rows(path)
    assert info.value.line == 4 and info.value.path == str(path)
    assert str(info.value).startswith(f"{path} line 4: invalid JSON")


def test_json_scalar_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "scalar.json"
    path.write_text('{"rows": []}')
    with pytest.raises(DatasetError, match="list of rows"):
        _rows(path)


def test_parquet_rows(tmp_path: Path, data_fixtures_dir: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    expected = _standard_rows(data_fixtures_dir)
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(expected), path, row_group_size=3)
    rows = _rows(path)
    assert [line for line, _ in rows] == list(range(1, len(expected) + 1))
    assert [row for _, row in rows] == expected


def test_load_from_disk_folder(tmp_path: Path, data_fixtures_dir: Path) -> None:
    import datasets

    expected = _standard_rows(data_fixtures_dir)
    datasets.Dataset.from_list(expected).save_to_disk(str(tmp_path / "ds"))
    rows = _rows(tmp_path / "ds")
    assert [row for _, row in rows] == expected
    assert rows[-1][0] == len(expected)

    datasets.DatasetDict({"train": datasets.Dataset.from_list(expected[:2])}).save_to_disk(
        str(tmp_path / "dd")
    )
    assert [row for _, row in _rows(tmp_path / "dd")] == expected[:2]


def test_missing_file_unsupported_suffix_and_plain_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="file not found") as info:
        read_rows(tmp_path / "nope.jsonl")
    assert info.value.path == str(tmp_path / "nope.jsonl")
    csv = tmp_path / "pairs.csv"
    csv.write_text("prompt,chosen,rejected\n")
    with pytest.raises(DatasetError, match="unsupported file type '.csv'"):
        read_rows(csv)
    (tmp_path / "folder").mkdir()
    with pytest.raises(DatasetError, match="save_to_disk"):
        read_rows(tmp_path / "folder")

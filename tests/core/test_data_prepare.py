"""prepare_data end to end: every file type and format, bad rows, splits, max_rows, fingerprint, report."""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path
from typing import Any

import pytest

from core.data import DatasetError, PreparedData, ValidationReport, prepare_data
from core.spec import DatasetSpec

EOS = 50256
ASSISTANT = "\n\nAssistant:"
# bad_rows.jsonl: line -> kind (line 5 is blank; lines 1, 4, 9, 10 are good; 9 has a ~70-token prompt)
BAD_LINES = {2: "invalid_json", 3: "missing_field", 6: "empty_field", 7: "identical", 8: "wrong_shape"}
BAD_LINES |= {11: "wrong_shape", 12: "empty_field"}


def _prepare(
    train: Path | str, tokenizer: Any, max_length: int = 128, seed: int = 0, **spec: Any
) -> PreparedData:
    return prepare_data(DatasetSpec(train=str(train), **spec), tokenizer, max_length, seed)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


@pytest.fixture(scope="module")
def hh(shared_data_dir: Path) -> tuple[PreparedData, float]:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(shared_data_dir / "tokenizers" / "gpt2" / "tokenizer.json"),
        eos_token="<|endoftext|>",
    )
    start = time.perf_counter()
    data = _prepare(
        shared_data_dir / "hh-rlhf" / "harmless-base-test.jsonl.gz", tokenizer, 512, eval_fraction=0.05
    )
    return data, time.perf_counter() - start


def test_hh_rlhf_implicit_prompts(hh: tuple[PreparedData, float], gpt2_tokenizer: Any) -> None:
    data, seconds = hh
    report = data.report
    assert seconds < 15  # typically ~1 s: three batched tokenizer calls per 512 rows
    assert report.format == "implicit_prompt"
    assert report.rows_total == 2312 == report.rows_used + report.rows_skipped
    # real rows whose chosen reply is empty ("...\n\nAssistant: "): reported, not used
    assert report.skipped_by_reason == {"empty_field": report.rows_skipped} and report.rows_skipped >= 1
    assert report.skipped[0].line == 87 and report.skipped[0].reason == "empty field 'chosen'"
    assert (report.train_rows, report.eval_rows) == (len(data.train), len(data.eval))
    assert report.eval_rows == round(report.rows_used * 0.05)
    for pair in data.train + data.eval:
        assert gpt2_tokenizer.decode(pair.prompt_ids[-6:]).endswith(ASSISTANT)  # truncation keeps the end
        assert len(pair.chosen_ids) >= 2 and len(pair.rejected_ids) >= 2  # text plus EOS at least
        assert pair.length <= 512
        if not pair.truncated:
            assert pair.chosen_ids[-1] == EOS == pair.rejected_ids[-1]
    first = min(data.train + data.eval, key=lambda p: p.line)
    assert first.line == 1
    assert gpt2_tokenizer.decode(first.chosen_ids).startswith(" No, sorry!  All of these involve a pen")


def test_hh_report_numbers(hh: tuple[PreparedData, float]) -> None:
    data, _ = hh
    report = data.report
    pairs = data.train + data.eval
    assert report.truncated_rows == sum(p.truncated for p in pairs) > 0
    assert report.truncation_rate == pytest.approx(report.truncated_rows / report.rows_used)
    lengths = report.token_lengths
    for stats in (lengths.prompt, lengths.chosen, lengths.rejected, lengths.total):
        assert 0 < stats.p50 <= stats.p90 <= stats.p99 <= stats.max
    # untruncated lengths: the longest rows exceed max_length, and exactly those were truncated
    assert lengths.total.max > 512 and lengths.total.p50 < 512
    assert lengths.total.max >= max(lengths.prompt.max, lengths.chosen.max)
    text = report.to_text()
    assert "2312 rows read" in text and "empty_field" in text and "line 87: empty field 'chosen'" in text
    assert f"{report.truncated_rows} rows" in text
    assert ValidationReport.model_validate_json(report.model_dump_json()) == report


def test_standard_jsonl(data_fixtures_dir: Path, gpt2_tokenizer: Any) -> None:
    data = _prepare(data_fixtures_dir / "standard.jsonl", gpt2_tokenizer)
    assert data.report.format == "standard" and data.report.rows_skipped == 0
    assert [p.line for p in data.train] == list(range(1, 9)) and data.eval == []
    assert gpt2_tokenizer.decode(data.train[3].prompt_ids) == "Translate 'good morning' into Spanish."
    assert gpt2_tokenizer.decode(data.train[3].chosen_ids) == " Buenos días.<|endoftext|>"


@pytest.mark.parametrize("name", ["conversational.json", "openai.jsonl"])
def test_chat_formats(name: str, data_fixtures_dir: Path, chat_tokenizer: Any) -> None:
    data = _prepare(data_fixtures_dir / name, chat_tokenizer)
    assert data.report.format == name.split(".")[0] and data.report.rows_skipped == 0
    pair = data.train[1]
    prompt = chat_tokenizer.decode(pair.prompt_ids)
    assert prompt.startswith("<|system|>\n") and prompt.endswith("<|end|>\n<|assistant|>\n")
    assert chat_tokenizer.decode(pair.chosen_ids).endswith("<|end|>\n<|endoftext|>")


def test_chat_data_without_chat_template_names_the_file(data_fixtures_dir: Path, gpt2_tokenizer: Any) -> None:
    path = data_fixtures_dir / "conversational.json"
    with pytest.raises(DatasetError, match="chat template") as info:
        _prepare(path, gpt2_tokenizer)
    assert info.value.path == str(path)
    with pytest.raises(DatasetError, match="chat template"):
        _prepare(data_fixtures_dir / "openai.jsonl", gpt2_tokenizer, format="openai")


def test_parquet_and_saved_dataset(tmp_path: Path, data_fixtures_dir: Path, gpt2_tokenizer: Any) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in _lines(data_fixtures_dir / "standard.jsonl")]
    rows[2]["rejected"] = None  # a null cell
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    reference = _prepare(data_fixtures_dir / "standard.jsonl", gpt2_tokenizer)
    for source in (tmp_path / "pairs.parquet", tmp_path / "saved"):
        data = _prepare(source, gpt2_tokenizer)
        assert [(s.line, s.reason) for s in data.report.skipped] == [(3, "missing field 'rejected'")]
        expected = [p for p in reference.train if p.line != 3]
        assert data.train == expected


def test_bad_rows_skipped_with_line_numbers(data_fixtures_dir: Path, gpt2_tokenizer: Any) -> None:
    data = _prepare(data_fixtures_dir / "bad_rows.jsonl", gpt2_tokenizer)
    report = data.report
    assert {s.line: s.kind for s in report.skipped} == BAD_LINES
    assert [s.line for s in report.skipped] == sorted(BAD_LINES)
    assert [p.line for p in data.train] == [1, 4, 9, 10]
    assert report.skipped_by_reason == {
        "invalid_json": 1,
        "missing_field": 1,
        "empty_field": 2,
        "identical": 1,
        "wrong_shape": 2,
    }
    assert (report.rows_total, report.rows_used, report.rows_skipped) == (11, 4, 7)
    reasons = {s.line: s.reason for s in report.skipped}
    assert reasons[3] == "missing field 'rejected'" and reasons[8].startswith(
        "wrong shape: row looks like conv"
    )


def test_no_room_rows_when_prompt_truncation_is_off(data_fixtures_dir: Path, gpt2_tokenizer: Any) -> None:
    path = data_fixtures_dir / "bad_rows.jsonl"
    cut = _prepare(path, gpt2_tokenizer, max_length=32)
    long_row = next(p for p in cut.train if p.line == 9)
    assert long_row.truncated and len(long_row.prompt_ids) + len(long_row.chosen_ids) <= 32
    assert cut.report.truncated_rows == 1
    strict = _prepare(path, gpt2_tokenizer, max_length=32, truncate_prompt=False)
    skipped = {s.line: s for s in strict.report.skipped}
    assert skipped[9].kind == "no_room" and "max_length 32" in skipped[9].reason
    assert [p.line for p in strict.train] == [1, 4, 10]


@pytest.mark.parametrize(("bad_line", "kind"), sorted(BAD_LINES.items()) + [(9, "no_room")])
def test_fail_mode_raises_with_the_line(
    bad_line: int, kind: str, tmp_path: Path, data_fixtures_dir: Path, gpt2_tokenizer: Any
) -> None:
    source = _lines(data_fixtures_dir / "bad_rows.jsonl")
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([source[0], source[3], source[bad_line - 1]]) + "\n")
    with pytest.raises(DatasetError) as info:
        _prepare(path, gpt2_tokenizer, max_length=32, on_bad_row="fail", truncate_prompt=False)
    err = info.value
    assert (err.path, err.line, err.kind) == (str(path), 3, kind)
    assert str(err).startswith(f"{path} line 3: ")


def test_fail_mode_reports_the_first_bad_line(data_fixtures_dir: Path, gpt2_tokenizer: Any) -> None:
    with pytest.raises(DatasetError, match=r"bad_rows.jsonl line 2: invalid JSON"):
        _prepare(data_fixtures_dir / "bad_rows.jsonl", gpt2_tokenizer, on_bad_row="fail")
    clean = _prepare(data_fixtures_dir / "standard.jsonl", gpt2_tokenizer, on_bad_row="fail")
    assert clean.report.rows_used == 8


def test_no_usable_rows_and_missing_file(
    tmp_path: Path, data_fixtures_dir: Path, gpt2_tokenizer: Any
) -> None:
    path = tmp_path / "all_bad.jsonl"
    path.write_text('{"prompt": "q", "chosen": "same", "rejected": "same"}\nnot json\n')
    with pytest.raises(DatasetError, match=r"no usable rows: all 2 rows skipped .*first: line 1") as info:
        _prepare(path, gpt2_tokenizer)
    assert info.value.path == str(path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DatasetError, match="no rows"):
        _prepare(empty, gpt2_tokenizer)
    with pytest.raises(DatasetError, match="file not found"):
        _prepare(tmp_path / "missing.jsonl", gpt2_tokenizer)
    with pytest.raises(DatasetError, match="no usable rows"):  # a format that fits no row
        _prepare(data_fixtures_dir / "standard.jsonl", gpt2_tokenizer, format="implicit_prompt")


def test_broken_first_row_does_not_decide_the_format(
    tmp_path: Path, data_fixtures_dir: Path, gpt2_tokenizer: Any
) -> None:
    path = tmp_path / "data.jsonl"
    rows = _lines(data_fixtures_dir / "standard.jsonl")
    path.write_text("\n".join(['{"chosen": " only a chosen answer"}', *rows]) + "\n")
    data = _prepare(path, gpt2_tokenizer)
    assert data.report.format == "standard" and len(data.train) == 8
    assert [(s.line, s.kind) for s in data.report.skipped] == [(1, "missing_field")]


def test_max_rows_uses_the_first_usable_rows(data_fixtures_dir: Path, gpt2_tokenizer: Any) -> None:
    data = _prepare(data_fixtures_dir / "bad_rows.jsonl", gpt2_tokenizer, max_rows=3)
    assert [p.line for p in data.train] == [1, 4, 9]
    assert [s.line for s in data.report.skipped] == [2, 3, 6, 7, 8]  # reading stopped after line 9
    assert data.report.rows_total == 8


def test_eval_fraction_split_is_deterministic_and_disjoint(
    data_fixtures_dir: Path, gpt2_tokenizer: Any
) -> None:
    path = data_fixtures_dir / "standard.jsonl"
    runs = [_prepare(path, gpt2_tokenizer, seed=seed, eval_fraction=0.25) for seed in (4, 4, 5, 6, 7)]
    a, b = runs[0], runs[1]
    assert a.train == b.train and a.eval == b.eval and a.fingerprint == b.fingerprint
    train_lines, eval_lines = [p.line for p in a.train], [p.line for p in a.eval]
    assert len(eval_lines) == 2 and not set(train_lines) & set(eval_lines)
    assert sorted(train_lines + eval_lines) == list(range(1, 9))
    assert train_lines == sorted(train_lines)  # file order kept inside each split
    assert len({tuple(p.line for p in run.eval) for run in runs}) > 1  # the seed picks the held-out rows


def test_separate_eval_file(data_fixtures_dir: Path, gpt2_tokenizer: Any) -> None:
    spec = DatasetSpec(
        train=str(data_fixtures_dir / "standard.jsonl"), eval=str(data_fixtures_dir / "bad_rows.jsonl")
    )
    data = prepare_data(spec, gpt2_tokenizer, 128, 0)
    assert len(data.train) == 8 and [p.line for p in data.eval] == [1, 4, 9, 10]
    report = data.report
    assert report.eval_path == spec.eval and (report.train_rows, report.eval_rows) == (8, 4)
    assert {s.split for s in report.skipped} == {"eval"} and report.rows_skipped == len(BAD_LINES)


def test_fingerprint_tracks_data_tokenizer_and_settings(
    tmp_path: Path, data_fixtures_dir: Path, gpt2_tokenizer: Any, fresh_gpt2_tokenizer: Any
) -> None:
    path = data_fixtures_dir / "standard.jsonl"
    base = _prepare(path, gpt2_tokenizer).fingerprint
    assert len(base) == 64 and int(base, 16) >= 0
    assert _prepare(path, gpt2_tokenizer).fingerprint == base
    assert _prepare(path, fresh_gpt2_tokenizer).fingerprint == base  # same tokenizer, another object
    assert _prepare(path, gpt2_tokenizer, max_length=127).fingerprint != base
    assert _prepare(path, gpt2_tokenizer, truncate_prompt=False).fingerprint != base
    assert _prepare(path, gpt2_tokenizer, max_rows=7).fingerprint != base
    edited = tmp_path / "edited.jsonl"
    edited.write_text(path.read_text().replace("Buenos días.", "Buenos dias."))
    assert _prepare(edited, gpt2_tokenizer).fingerprint != base
    fresh_gpt2_tokenizer.add_tokens(["<|new_token|>"])
    assert _prepare(path, fresh_gpt2_tokenizer).fingerprint != base


def test_dataset_error_survives_pickling() -> None:
    err = DatasetError("missing field 'rejected'", path="data.jsonl", line=17, kind="missing_field")
    assert str(err) == "data.jsonl line 17: missing field 'rejected'"
    copy = pickle.loads(pickle.dumps(err))
    assert (str(copy), copy.path, copy.line, copy.reason, copy.kind) == (
        str(err),
        "data.jsonl",
        17,
        err.reason,
        err.kind,
    )

"""detect_format and normalise: the four formats, implicit-prompt extraction, chat rendering, row errors."""

from __future__ import annotations

from typing import Any

import pytest

from core.data import DatasetError, PreferenceText, RowError, detect_format, normalise, split_implicit_prompt

CONV_ROW = {
    "prompt": [{"role": "user", "content": "What is 2 + 2?"}],
    "chosen": [{"role": "assistant", "content": "4"}],
    "rejected": [{"role": "assistant", "content": "5"}],
}
OPENAI_ROW = {
    "input": {"messages": [{"role": "user", "content": "What is 2 + 2?"}]},
    "preferred_output": [{"role": "assistant", "content": "4"}],
    "non_preferred_output": [{"role": "assistant", "content": "5"}],
}


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": "q", "chosen": "a", "rejected": "b"}, "standard"),
        ({"prompt": None, "chosen": "a", "rejected": "b"}, "standard"),  # a null column in Parquet
        (
            {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"},
            "implicit_prompt",
        ),
        (CONV_ROW, "conversational"),
        (
            {"chosen": CONV_ROW["prompt"] + CONV_ROW["chosen"], "rejected": CONV_ROW["rejected"]},
            "conversational",
        ),
        (OPENAI_ROW, "openai"),
    ],
)
def test_detect_format(row: dict[str, Any], expected: str) -> None:
    assert detect_format(row) == expected


def test_detect_format_rejects_unrelated_rows() -> None:
    with pytest.raises(RowError, match="no preference fields") as info:
        detect_format({"question": "q", "answer": "a"})
    assert info.value.kind == "wrong_shape"


def test_standard_row_kept_verbatim() -> None:
    row = {"prompt": "Capital of Peru?", "chosen": " Lima.", "rejected": " Quito.", "id": 7}
    assert normalise(row, "auto", None) == PreferenceText("Capital of Peru?", " Lima.", " Quito.")


@pytest.mark.parametrize(
    ("row", "fmt", "kind", "reason"),
    [
        ({"prompt": "q", "chosen": "a"}, "standard", "missing_field", "missing field 'rejected'"),
        ({"chosen": "a", "rejected": "b"}, "standard", "missing_field", "missing field 'prompt'"),
        (
            {"prompt": "q", "chosen": " \n\t", "rejected": "b"},
            "standard",
            "empty_field",
            "empty field 'chosen'",
        ),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "standard", "empty_field", "empty field 'prompt'"),
        (
            {"prompt": "q", "chosen": " same", "rejected": "same "},
            "standard",
            "identical",
            "chosen and rejected",
        ),
        ({"prompt": "q", "chosen": 3, "rejected": "b"}, "standard", "wrong_shape", "field 'chosen' is int"),
        (CONV_ROW, "standard", "wrong_shape", "looks like conversational"),
        (OPENAI_ROW, "conversational", "wrong_shape", "looks like openai"),
        ({"chosen": "same text", "rejected": "same text"}, "implicit_prompt", "identical", "identical"),
        ({"chosen": "Yes.", "rejected": "No."}, "implicit_prompt", "empty_field", "share no common prefix"),
    ],
)
def test_row_errors(row: dict[str, Any], fmt: str, kind: str, reason: str) -> None:
    with pytest.raises(RowError) as info:
        normalise(row, fmt, None)
    assert info.value.kind == kind
    assert reason in info.value.reason


def test_implicit_prompt_cut_after_last_assistant_marker() -> None:
    chosen = (
        "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: Why did the chicken cross"
    )
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: Why not."
    text = normalise({"chosen": chosen, "rejected": rejected}, "implicit_prompt")
    # the common prefix runs into "Why ", but the prompt stops right after the marker
    assert text.prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant:"
    assert text.chosen == " Why did the chicken cross"
    assert text.rejected == " Why not."
    assert text.prompt + text.chosen == chosen and text.prompt + text.rejected == rejected


def test_implicit_prompt_without_marker_uses_trl_rule() -> None:
    text = split_implicit_prompt("The sky is blue", "The sky is green")
    assert text == PreferenceText("The sky is", " blue", " green")  # space before divergence goes right
    text = split_implicit_prompt("Answer:yes", "Answer:no")
    assert text == PreferenceText("Answer:", "yes", "no")


def test_implicit_prompt_nothing_left_for_a_completion() -> None:
    with pytest.raises(RowError, match="empty field 'rejected'"):
        normalise(
            {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant:"}, "auto"
        )


def test_conversational_rendered_with_chat_template(chat_tokenizer: Any) -> None:
    text = normalise(CONV_ROW, "conversational", chat_tokenizer)
    assert text.prompt == "<|user|>\nWhat is 2 + 2?<|end|>\n<|assistant|>\n"
    assert text.chosen == "4<|end|>\n"
    assert text.rejected == "5<|end|>\n"


def test_conversational_implicit_prompt_messages(chat_tokenizer: Any) -> None:
    row = {
        "chosen": CONV_ROW["prompt"] + CONV_ROW["chosen"],
        "rejected": CONV_ROW["prompt"] + CONV_ROW["rejected"],
    }
    assert normalise(row, "auto", chat_tokenizer) == normalise(CONV_ROW, "auto", chat_tokenizer)


def test_openai_rendered_like_conversational(chat_tokenizer: Any) -> None:
    assert normalise(OPENAI_ROW, "auto", chat_tokenizer) == normalise(CONV_ROW, "auto", chat_tokenizer)


def test_prompt_ending_with_assistant_turn_continues_it(chat_tokenizer: Any) -> None:
    row = {
        "prompt": [
            {"role": "user", "content": "Finish: roses are"},
            {"role": "assistant", "content": "Roses are"},
        ],
        "chosen": [{"role": "assistant", "content": "red"}],
        "rejected": [{"role": "assistant", "content": "loud"}],
    }
    text = normalise(row, "conversational", chat_tokenizer)
    # as in TRL: the final assistant turn is left open (continue_final_message), no generation prompt
    assert text.prompt.endswith("<|assistant|>\nRoses are")
    full = chat_tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
    assert text.prompt + text.chosen == full


@pytest.mark.parametrize(
    ("change", "kind", "reason"),
    [
        (
            {"chosen": [{"role": "assistant", "content": "  "}]},
            "empty_field",
            "empty field 'chosen' (message 1",
        ),
        ({"chosen": []}, "empty_field", "empty field 'chosen'"),
        ({"rejected": None}, "missing_field", "missing field 'rejected'"),
        ({"chosen": [{"content": "4"}]}, "wrong_shape", "chosen message 1"),
        ({"rejected": [{"role": "assistant", "content": "4"}]}, "identical", "identical"),
    ],
)
def test_conversational_row_errors(chat_tokenizer: Any, change: dict, kind: str, reason: str) -> None:
    with pytest.raises(RowError) as info:
        normalise({**CONV_ROW, **change}, "conversational", chat_tokenizer)
    assert (info.value.kind, reason in info.value.reason) == (kind, True)


def test_openai_row_errors(chat_tokenizer: Any) -> None:
    with pytest.raises(RowError, match=r"missing field 'input.messages'"):
        normalise({**OPENAI_ROW, "input": {"tools": []}}, "openai", chat_tokenizer)
    with pytest.raises(RowError, match=r"missing field 'non_preferred_output'"):
        normalise(
            {k: v for k, v in OPENAI_ROW.items() if k != "non_preferred_output"}, "openai", chat_tokenizer
        )


def test_chat_formats_need_a_chat_template(gpt2_tokenizer: Any) -> None:
    for row in (CONV_ROW, OPENAI_ROW):
        with pytest.raises(DatasetError, match="chat template"):
            normalise(row, "auto", gpt2_tokenizer)

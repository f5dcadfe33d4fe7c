"""Recognise the four preference formats and normalise a raw row to prompt/chosen/rejected text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.data.errors import EMPTY_FIELD, IDENTICAL, MISSING_FIELD, WRONG_SHAPE, DatasetError, RowError

FORMATS = ("standard", "conversational", "implicit_prompt", "openai")
ASSISTANT_MARKER = "\n\nAssistant:"
_OPENAI_KEYS = ("input", "preferred_output", "non_preferred_output")
CHAT_ROLES = ("system", "user", "assistant", "tool")

Messages = list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class PreferenceText:
    """One normalised preference pair: the prompt text and the two completion texts that follow it."""

    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True, slots=True)
class ChatPair:
    """A chat-format row whose messages passed every check but rendering: prompt, chosen and rejected turns."""

    prompt: Messages
    chosen: Messages
    rejected: Messages


def detect_format(row: dict[str, Any]) -> str:
    """Name the format a row is in from its keys and value types; RowError if it fits none."""
    if not isinstance(row, dict):
        raise RowError("wrong shape: row is not a JSON object", WRONG_SHAPE)
    if any(key in row for key in _OPENAI_KEYS):
        return "openai"
    if any(isinstance(row.get(key), list) for key in ("prompt", "chosen", "rejected")):
        return "conversational"
    if "prompt" in row:
        return "standard"
    if row.get("chosen") is not None or row.get("rejected") is not None:
        return "implicit_prompt"
    keys = ", ".join(sorted(map(str, row))[:8]) or "none"
    raise RowError(
        f"wrong shape: no preference fields (found: {keys}); expected prompt/chosen/rejected, "
        "chosen/rejected, or input/preferred_output/non_preferred_output",
        WRONG_SHAPE,
    )


def normalise(row: dict[str, Any], fmt: str, tokenizer: Any = None) -> PreferenceText:
    """Turn one raw row in format ``fmt`` (or "auto") into PreferenceText, or raise RowError.

    ``tokenizer`` is needed only for the chat formats (conversational, openai); a tokenizer
    without a chat template there is a DatasetError (the whole dataset cannot be used).
    """
    _, checked = check_row(row, fmt)
    if isinstance(checked, ChatPair):
        return _checked(render_chat(checked.prompt, checked.chosen, checked.rejected, tokenizer))
    return checked


def check_row(row: dict[str, Any], fmt: str = "auto") -> tuple[str, PreferenceText | ChatPair]:
    """Every check of ``normalise`` that needs no tokenizer: ``(format, text)``, or RowError.

    Plain formats come back as their PreferenceText; chat formats as a ChatPair of checked messages
    (lists of {role, content} with a role in CHAT_ROLES and non-empty string content), which only
    the chat template can turn into text. Uploads, which have no tokenizer, check rows with this.
    """
    detected = detect_format(row)
    if fmt == "auto":
        fmt = detected
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; choose from auto, {', '.join(FORMATS)}")
    if detected != fmt:
        if fmt == "standard" and detected == "implicit_prompt":
            raise RowError("missing field 'prompt'", MISSING_FIELD)
        raise RowError(
            f"wrong shape: row looks like {detected} data but the dataset format is {fmt}", WRONG_SHAPE
        )
    if fmt == "standard":
        text = PreferenceText(_text(row, "prompt"), _text(row, "chosen"), _text(row, "rejected"))
        return fmt, _checked(text)
    if fmt == "implicit_prompt":
        return fmt, _checked(_implicit(row))
    chat = _conversational(row) if fmt == "conversational" else _openai(row)
    if chat.chosen == chat.rejected:
        raise RowError("chosen and rejected are identical", IDENTICAL)
    return fmt, chat


def _checked(text: PreferenceText) -> PreferenceText:
    for name in ("prompt", "chosen", "rejected"):
        if not getattr(text, name).strip():
            raise RowError(f"empty field '{name}'", EMPTY_FIELD)
    if text.chosen.strip() == text.rejected.strip():
        raise RowError("chosen and rejected are identical", IDENTICAL)
    return text


def _text(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        raise RowError(f"missing field '{key}'", MISSING_FIELD)
    if not isinstance(value, str):
        raise RowError(
            f"wrong shape: field '{key}' is {type(value).__name__}, expected a string", WRONG_SHAPE
        )
    if not value.strip():
        raise RowError(f"empty field '{key}'", EMPTY_FIELD)
    return value


def common_prefix_len(a: str | list[Any], b: str | list[Any]) -> int:
    """Length of the longest common prefix of two strings (or lists), by binary search on slices."""
    hi = min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    lo = 0  # invariant: a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def split_implicit_prompt(chosen: str, rejected: str) -> PreferenceText:
    """Split two full dialogues that share a prefix into prompt and completions (HH-RLHF style).

    The prompt is their longest common prefix cut back to end right after the last
    "\\n\\nAssistant:" inside it; without that marker, TRL's ``extract_prompt`` rule applies (the
    common prefix, moved back by one when the character before the divergence is a space).
    """
    n = common_prefix_len(chosen, rejected)
    marker = chosen.rfind(ASSISTANT_MARKER, 0, n)
    if marker >= 0:
        cut = marker + len(ASSISTANT_MARKER)
    else:
        cut = n
        diverged = n < min(len(chosen), len(rejected))
        if diverged and n > 0 and chosen[n - 1] == " ":
            cut = n - 1
    return PreferenceText(chosen[:cut], chosen[cut:], rejected[cut:])


def _implicit(row: dict[str, Any]) -> PreferenceText:
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    if chosen.strip() == rejected.strip():
        raise RowError("chosen and rejected are identical", IDENTICAL)
    text = split_implicit_prompt(chosen, rejected)
    if not text.prompt.strip():
        raise RowError("empty field 'prompt': chosen and rejected share no common prefix", EMPTY_FIELD)
    return text


def _messages(value: Any, label: str) -> Messages:
    if value is None:
        raise RowError(f"missing field '{label}'", MISSING_FIELD)
    if not isinstance(value, list):
        raise RowError(
            f"wrong shape: field '{label}' is {type(value).__name__}, expected a list of {{role, content}} messages",
            WRONG_SHAPE,
        )
    if not value:
        raise RowError(f"empty field '{label}' (no messages)", EMPTY_FIELD)
    for i, msg in enumerate(value, start=1):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or "content" not in msg:
            raise RowError(f"wrong shape: {label} message {i} is not a {{role, content}} object", WRONG_SHAPE)
        if msg["role"] not in CHAT_ROLES:
            raise RowError(
                f"wrong shape: {label} message {i} has role {msg['role'][:40]!r}; "
                f"expected one of {', '.join(CHAT_ROLES)}",
                WRONG_SHAPE,
            )
        content = msg["content"]
        if content is not None and not isinstance(content, str):
            raise RowError(f"wrong shape: {label} message {i} content is not a string", WRONG_SHAPE)
        if content is None or not content.strip():
            raise RowError(f"empty field '{label}' (message {i} has empty content)", EMPTY_FIELD)
    return value


def _conversational(row: dict[str, Any]) -> ChatPair:
    if row.get("prompt") is not None:
        prompt = _messages(row["prompt"], "prompt")
        chosen, rejected = _messages(row.get("chosen"), "chosen"), _messages(row.get("rejected"), "rejected")
    else:  # implicit prompt in message form: the shared leading messages are the prompt
        full_c, full_r = _messages(row.get("chosen"), "chosen"), _messages(row.get("rejected"), "rejected")
        if full_c == full_r:
            raise RowError("chosen and rejected are identical", IDENTICAL)
        n = common_prefix_len(full_c, full_r)
        if n == 0:
            raise RowError("empty field 'prompt': chosen and rejected share no leading messages", EMPTY_FIELD)
        prompt, chosen, rejected = full_c[:n], full_c[n:], full_r[n:]
        for label, part in (("chosen", chosen), ("rejected", rejected)):
            if not part:
                raise RowError(f"empty field '{label}' (no messages after the shared prompt)", EMPTY_FIELD)
    return ChatPair(prompt, chosen, rejected)


def _openai(row: dict[str, Any]) -> ChatPair:
    source = row.get("input")
    if source is None:
        raise RowError("missing field 'input'", MISSING_FIELD)
    if not isinstance(source, dict):
        raise RowError("wrong shape: field 'input' must be an object with 'messages'", WRONG_SHAPE)
    prompt = _messages(source.get("messages"), "input.messages")
    chosen = _messages(row.get("preferred_output"), "preferred_output")
    rejected = _messages(row.get("non_preferred_output"), "non_preferred_output")
    return ChatPair(prompt, chosen, rejected)


def require_chat_template(tokenizer: Any) -> None:
    """DatasetError unless ``tokenizer`` can render chat messages."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DatasetError(
            "conversational data needs a tokenizer with a chat template, and this tokenizer has none: "
            "use a chat model's tokenizer, set tokenizer.chat_template, or convert the data to "
            "prompt/chosen/rejected strings"
        )


def render_chat(prompt: Messages, chosen: Messages, rejected: Messages, tokenizer: Any) -> PreferenceText:
    """Render messages with the chat template the way TRL does: completions are suffixes of the full render."""
    require_chat_template(tokenizer)
    continue_final = prompt[-1].get("role") == "assistant"
    try:
        prompt_text = tokenizer.apply_chat_template(
            prompt,
            tokenize=False,
            add_generation_prompt=not continue_final,
            continue_final_message=continue_final,
        )
        full_c = tokenizer.apply_chat_template(prompt + chosen, tokenize=False)
        full_r = tokenizer.apply_chat_template(prompt + rejected, tokenize=False)
    except Exception as exc:  # jinja raises its own errors, e.g. "roles must alternate"
        raise RowError(f"wrong shape: the chat template cannot render this row: {exc}", WRONG_SHAPE) from exc
    # Some templates render the generation prompt differently from a finished turn: keep the shared part.
    n = min(common_prefix_len(prompt_text, full_c), common_prefix_len(prompt_text, full_r))
    return PreferenceText(prompt_text[:n], full_c[n:], full_r[n:])

"""encode_pair and truncate_ids: special tokens, EOS, and the truncation rule."""

from __future__ import annotations

from typing import Any

import pytest

from core.data import EncodedPair, PreferenceText, RowError, encode_batch, encode_pair, truncate_ids

EOS = 50256


def test_encode_pair_tokens_and_eos(gpt2_tokenizer: Any) -> None:
    text = PreferenceText("Capital of Peru?", " Lima.", " Quito, I think.")
    pair = encode_pair(text, gpt2_tokenizer, 64, line=5)
    assert pair.line == 5 and pair.truncated is False
    assert pair.prompt_ids == gpt2_tokenizer("Capital of Peru?")["input_ids"]
    assert pair.chosen_ids == gpt2_tokenizer(" Lima.", add_special_tokens=False)["input_ids"] + [EOS]
    assert (
        pair.rejected_ids[-1] == EOS and gpt2_tokenizer.decode(pair.rejected_ids[:-1]) == " Quito, I think."
    )
    assert pair.length == len(pair.prompt_ids) + len(pair.rejected_ids)


def test_no_eos_appended_when_tokenizer_has_none(fresh_gpt2_tokenizer: Any) -> None:
    fresh_gpt2_tokenizer.eos_token = None
    pair = encode_pair(PreferenceText("Q:", " yes", " no"), fresh_gpt2_tokenizer, 16)
    assert pair.chosen_ids == fresh_gpt2_tokenizer(" yes", add_special_tokens=False)["input_ids"]


def test_bos_added_by_template_and_tokenizer_is_not_doubled(fresh_gpt2_tokenizer: Any) -> None:
    fresh_gpt2_tokenizer.bos_token = "<|endoftext|>"
    ids = [EOS, EOS, 1, 2]
    pair = truncate_ids(ids, [3], [4], 16)
    assert pair[0] == ids  # truncate_ids itself never edits ids
    text = PreferenceText("<|endoftext|>Hi", " a", " b")
    encoded = encode_pair(text, fresh_gpt2_tokenizer, 16)
    assert encoded.prompt_ids.count(EOS) == 1 and encoded.prompt_ids[0] == EOS


def _ids(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def test_truncation_not_needed() -> None:
    p, c, r = _ids(0, 10), _ids(100, 6), _ids(200, 4)
    assert truncate_ids(p, c, r, 16) == (p, c, r, False)


def test_truncation_cuts_prompt_start_only_when_completion_fits() -> None:
    p, c, r = _ids(0, 20), _ids(100, 6), _ids(200, 4)
    kp, kc, kr, cut = truncate_ids(p, c, r, 16)
    assert cut and kp == p[-10:] and kc == c and kr == r  # prompt keeps its END: max_length - C = 10 tokens


def test_truncation_keeps_at_least_half_for_the_prompt_and_completion_start() -> None:
    p, c, r = _ids(0, 40), _ids(100, 30), _ids(200, 5)
    kp, kc, kr, cut = truncate_ids(p, c, r, 32)
    assert cut
    assert kp == p[-16:]  # max(32 - 30, 32 // 2) = 16
    assert kc == c[:16] and kr == r  # completions keep their START
    short_prompt = _ids(0, 3)
    kp, kc, _, _ = truncate_ids(short_prompt, c, r, 16)
    assert kp == short_prompt and kc == c[:13]  # a short prompt is never padded up to half


def test_truncation_without_prompt_cutting() -> None:
    p, c, r = _ids(0, 20), _ids(100, 30), _ids(200, 5)
    kp, kc, kr, cut = truncate_ids(p, c, r, 32, truncate_prompt=False)
    assert cut and kp == p and kc == c[:12] and kr == r
    with pytest.raises(
        RowError, match=r"no room for any completion token \(prompt has 32 tokens, max_length 32\)"
    ):
        truncate_ids(_ids(0, 32), c, r, 32, truncate_prompt=False)


@pytest.mark.parametrize("max_length", [8, 9, 33, 64])
@pytest.mark.parametrize(("p", "c", "r"), [(1, 1, 1), (5, 50, 3), (50, 5, 5), (70, 70, 2), (7, 2, 60)])
@pytest.mark.parametrize("keep_first", [0, 1])
def test_truncation_never_exceeds_max_length(
    max_length: int, p: int, c: int, r: int, keep_first: int
) -> None:
    prompt, chosen, rejected = _ids(0, p), _ids(1000, c), _ids(2000, r)
    kp, kc, kr, cut = truncate_ids(prompt, chosen, rejected, max_length, keep_first=keep_first)
    assert len(kp) + len(kc) <= max_length and len(kp) + len(kr) <= max_length
    assert len(kp) == min(p, max(max_length - max(c, r), max_length // 2))
    body = kp[keep_first:] if len(kp) < p else kp
    assert body == prompt[len(prompt) - len(body) :] and kc == chosen[: len(kc)] and kr == rejected[: len(kr)]
    assert kp[:keep_first] == prompt[:keep_first]
    assert kp and kc and kr
    assert cut == (p + max(c, r) > max_length)


def test_encode_batch_marks_no_room_rows_in_place(gpt2_tokenizer: Any) -> None:
    long_prompt = "word " * 40
    texts = [
        PreferenceText("Hi", " a", " b"),
        PreferenceText(long_prompt, " a", " b"),
        PreferenceText("Yo", " c", " d"),
    ]
    results = encode_batch(texts, gpt2_tokenizer, 16, truncate_prompt=False, lines=[3, 4, 9])
    assert isinstance(results[0][0], EncodedPair) and results[0][0].line == 3
    assert isinstance(results[1][0], RowError) and results[1][0].kind == "no_room"
    assert (
        results[1][1].prompt == len(gpt2_tokenizer(long_prompt)["input_ids"]) > 16
    )  # raw lengths still reported
    assert isinstance(results[2][0], EncodedPair) and results[2][0].line == 9
    with pytest.raises(RowError, match="no room"):
        encode_pair(texts[1], gpt2_tokenizer, 16, truncate_prompt=False)


def test_encode_pair_truncates_real_text(gpt2_tokenizer: Any) -> None:
    prompt = (
        "\n\nHuman: " + "Tell me everything about the history of the Roman empire. " * 10 + "\n\nAssistant:"
    )
    text = PreferenceText(prompt, " The Roman empire began in 27 BC." * 5, " No.")
    pair = encode_pair(text, gpt2_tokenizer, 48)
    assert pair.truncated and len(pair.prompt_ids) + len(pair.chosen_ids) == 48
    assert gpt2_tokenizer.decode(pair.prompt_ids).endswith("\n\nAssistant:")
    assert gpt2_tokenizer.decode(pair.chosen_ids).startswith(" The Roman empire began")
    assert pair.rejected_ids[-1] == EOS  # the short completion keeps its EOS


def test_cut_prompt_keeps_its_leading_bos(fresh_gpt2_tokenizer: Any) -> None:
    prompt, chosen = [EOS, *_ids(100, 39)], _ids(500, 30)
    kp, kc, _, cut = truncate_ids(prompt, chosen, [1], 32, keep_first=1)
    assert cut and kp == [EOS, *prompt[-15:]] and kc == chosen[:16]
    fresh_gpt2_tokenizer.bos_token = "<|endoftext|>"
    text = PreferenceText(
        "<|endoftext|>" + "Tell me about Rome. " * 20, " Rome was founded in 753 BC." * 4, " No."
    )
    pair = encode_pair(text, fresh_gpt2_tokenizer, 32)
    assert pair.truncated and len(pair.prompt_ids) + len(pair.chosen_ids) == 32
    assert pair.prompt_ids[0] == EOS and pair.prompt_ids.count(EOS) == 1
    assert fresh_gpt2_tokenizer.decode(pair.prompt_ids[1:]).endswith("Tell me about Rome. ")

"""Packed prompt-sharing scoring equals scoring chosen and rejected as separate causal sequences."""

from __future__ import annotations

import torch

from core.data import prepare_data
from core.models import load_model, load_tokenizer
from core.packing import CHOSEN, PAD, PROMPT, REJECTED, pack_pairs
from core.scoring import PairScorer
from core.spec import DatasetSpec
from tests.conftest import HH_FILE


def _separate_logps(model, prompt: list[int], completion: list[int]) -> float:
    logits = model(torch.tensor([prompt + completion])).logits[0]
    logps = torch.log_softmax(logits.double(), dim=-1)
    return float(sum(logps[len(prompt) - 1 + k, tok] for k, tok in enumerate(completion)))


def test_packed_scores_equal_separate_sequences_on_hh_pairs(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    data = prepare_data(DatasetSpec(train=str(HH_FILE), max_rows=6), tok, 512, seed=0)
    model = load_model(str(tiny_model_dir)).eval()
    pairs = data.train[:6]
    batch = pack_pairs(pairs, range(len(pairs)), pad_id=tok.pad_token_id)
    with torch.no_grad():
        scores = PairScorer(model)(batch)
        for i, p in enumerate(pairs):
            assert (
                abs(float(scores.chosen_logps[i]) - _separate_logps(model, p.prompt_ids, p.chosen_ids)) < 1e-3
            )
            assert (
                abs(float(scores.rejected_logps[i]) - _separate_logps(model, p.prompt_ids, p.rejected_ids))
                < 1e-3
            )


def test_packing_layout_and_mask():
    class P:
        def __init__(self, p, c, r):
            self.prompt_ids, self.chosen_ids, self.rejected_ids = p, c, r

    batch = pack_pairs([P([1, 2, 3], [4, 5], [6]), P([7], [8], [9, 10, 11])], [5, 9], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 0]]
    assert batch.segments.tolist()[0] == [PROMPT] * 3 + [CHOSEN] * 2 + [REJECTED]
    assert batch.segments.tolist()[1] == [PROMPT, CHOSEN, REJECTED, REJECTED, REJECTED, PAD]
    # rejected positions restart right after the prompt
    assert batch.position_ids.tolist()[0][:6] == [0, 1, 2, 3, 4, 3]
    mask = batch.attention_mask(torch.float32)[0, 0] == 0  # True = may attend
    assert mask[5].tolist() == [
        True,
        True,
        True,
        False,
        False,
        True,
    ]  # rejected sees prompt + itself, not chosen
    assert mask[4].tolist() == [True, True, True, True, True, False]
    # first completion token of both answers is predicted from the prompt's last position
    assert batch.source_index.tolist()[:2] == [2, 3] and batch.target_ids.tolist()[:2] == [4, 5]
    assert batch.example_index.tolist() == [5, 9]
    assert batch.chosen_lengths.tolist() == [2, 1] and batch.rejected_lengths.tolist() == [1, 3]
    assert abs(batch.padding_fraction - 1 / 12) < 1e-9


def test_logits_metric_is_the_mean_completion_logit(tiny_model_dir):
    """`logits/chosen` is the mean over completion positions and vocabulary (computed without a second vocab pass)."""

    class P:
        def __init__(self, p, c, r):
            self.prompt_ids, self.chosen_ids, self.rejected_ids = p, c, r

    model = load_model(str(tiny_model_dir)).eval()
    pairs = [P([11, 12, 13, 14], [5, 6, 7], [8, 9]), P([21, 22], [30], [31, 32, 33])]
    batch = pack_pairs(pairs, range(2))
    with torch.no_grad():
        scores = PairScorer(model)(batch)
        for i, p in enumerate(pairs):
            for completion, got in (
                (p.chosen_ids, scores.chosen_logits_mean[i]),
                (p.rejected_ids, scores.rejected_logits_mean[i]),
            ):
                logits = model(torch.tensor([p.prompt_ids + completion])).logits[0]
                want = logits[len(p.prompt_ids) - 1 : len(p.prompt_ids) - 1 + len(completion)].mean()
                assert abs(float(got) - float(want)) < 1e-6

"""Chunked completion log-probs equal the one-chunk computation in values and gradients, and bound memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.models import apply_lora, load_model
from core.packing import pack_pairs
from core.scoring import PairScorer, completion_logps, scorer_for
from core.spec import LoraSpec, TrainingSpec
from core.training import RunOptions, train
from tests.core.test_training import Recorder, make_spec


class _Pair:
    def __init__(self, prompt: list[int], chosen: list[int], rejected: list[int]) -> None:
        self.prompt_ids, self.chosen_ids, self.rejected_ids = prompt, chosen, rejected


def _pairs(seed: int, count: int = 4, vocab: int = 50000) -> list[_Pair]:
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    return [_Pair(ids(5 + k), ids(7 + 3 * k), ids(4 + 2 * k)) for k in range(count)]


def _reference_logps(hidden: torch.Tensor, weight: torch.Tensor, bias, targets, softcap=None):
    """Today's computation: the whole [N, vocab] logits at once."""
    logits = nn.functional.linear(hidden, weight, bias).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return -nn.functional.cross_entropy(logits, targets, reduction="none"), logits.mean(-1)


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_chunked_logps_match_one_chunk_values_and_gradients(chunk_size, softcap):
    torch.manual_seed(0)
    n, d, vocab = 50, 12, 301
    hidden = torch.randn(n, d, dtype=torch.float32, requires_grad=True)
    weight = torch.randn(vocab, d, requires_grad=True)
    bias = torch.randn(vocab, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    upstream = torch.randn(n)  # a non-uniform gradient from the loss, as DPO gives

    want, want_means = _reference_logps(hidden, weight, bias, targets, softcap)
    want_grads = torch.autograd.grad((want * upstream).sum(), (hidden, weight, bias))

    got, got_means = completion_logps(
        hidden,
        targets,
        lambda h: nn.functional.linear(h, weight, bias),
        chunk_size=chunk_size,
        softcap=softcap,
    )
    got_grads = torch.autograd.grad((got * upstream).sum(), (hidden, weight, bias))

    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_means, want_means, atol=1e-5, rtol=1e-5)
    assert not got_means.requires_grad
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_chunks_are_recomputed_in_backward_not_kept():
    """Each chunk's head runs once in forward and once more in backward (its logits were not saved)."""
    torch.manual_seed(0)
    hidden = torch.randn(10, 4, requires_grad=True)
    head = nn.Linear(4, 9, bias=False)
    calls: list[int] = []
    head.register_forward_hook(lambda _m, inp, _out: calls.append(inp[0].shape[0]))
    logps, _ = completion_logps(hidden, torch.randint(0, 9, (10,)), head, chunk_size=4)
    assert calls == [4, 4, 2]
    logps.sum().backward()
    assert sorted(calls) == sorted([4, 4, 2] * 2)
    calls.clear()
    with torch.no_grad():
        completion_logps(hidden, torch.randint(0, 9, (10,)), head, chunk_size=4)
    assert calls == [4, 4, 2]


def _scores_and_grads(model: nn.Module, batch, chunk_size: int):
    model.zero_grad(set_to_none=True)
    scores = PairScorer(model, chunk_size=chunk_size)(batch)
    weights = torch.linspace(0.5, 1.5, scores.chosen_logps.numel())
    ((scores.chosen_logps - 0.7 * scores.rejected_logps) * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return scores, grads


@pytest.mark.parametrize("lora", [False, True])
def test_pair_scorer_chunked_equals_unchunked_on_tiny_model(tiny_model_dir, lora):
    """Values, logits metric and every parameter gradient (tied embedding/head included) agree to 1e-5 in fp32."""
    model = load_model(str(tiny_model_dir)).train()
    if lora:
        model = apply_lora(model, LoraSpec(r=4))
    lm_head = model.get_output_embeddings() if not lora else model.get_base_model().get_output_embeddings()
    embed = model.get_input_embeddings()
    assert lm_head.weight is embed.weight  # the tiny model ties its head: one parameter, two uses
    pairs = _pairs(seed=1, vocab=lm_head.weight.shape[0])
    batch = pack_pairs(pairs, range(len(pairs)))
    assert batch.target_ids.numel() > 20

    whole, whole_grads = _scores_and_grads(model, batch, chunk_size=1_000_000)
    chunked, chunked_grads = _scores_and_grads(model, batch, chunk_size=5)
    for field in ("chosen_logps", "rejected_logps", "chosen_logits_mean", "rejected_logits_mean"):
        torch.testing.assert_close(getattr(chunked, field), getattr(whole, field), atol=1e-5, rtol=1e-5)
    assert whole_grads.keys() == chunked_grads.keys() and whole_grads
    if not lora:
        assert any("embed_tokens" in n for n in whole_grads)
    for name, grad in whole_grads.items():
        # summation order over positions differs per chunk: 1e-5 relative to the tensor's largest entry
        scale = float(grad.abs().max())
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-5 * scale, rtol=1e-5, msg=name)


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="chunk_size"):
        PairScorer(nn.Linear(2, 2), chunk_size=0)


def test_scorer_for_takes_the_training_settings():
    scorer = scorer_for(nn.Linear(2, 2), TrainingSpec(logps_chunk_size=7, precision="bf16"), "cpu")
    assert scorer.chunk_size == 7 and scorer.compute_dtype == torch.bfloat16
    assert scorer_for(nn.Linear(2, 2), TrainingSpec(), "cpu").compute_dtype == torch.float32


def test_training_with_small_chunks_equals_default(tiny_model_dir, learnable_pairs_file, tmp_path):
    """3 steps with 16-position chunks (many per batch, recomputed) vs the default: losses within 1e-5."""
    rows = {}
    for chunk in (16, 1024):
        rec = Recorder()
        spec = make_spec(tiny_model_dir, learnable_pairs_file, max_steps=3, logps_chunk_size=chunk)
        train(spec, RunOptions(output_dir=tmp_path / str(chunk)), rec)
        rows[chunk] = [v for _, v in rec.rows if "loss" in v]
    assert len(rows[16]) == 3
    for a, b in zip(rows[16], rows[1024], strict=True):
        for key in ("loss", "logps/chosen", "logits/chosen", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), key

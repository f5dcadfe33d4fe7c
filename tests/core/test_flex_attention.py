"""The FlexAttention path (BlockMask from segment ids, bucketed rows) equals the dense-mask SDPA path."""

from __future__ import annotations

import copy

import pytest
import torch

from core.attention import (
    FLEX,
    bucket_length,
    eager_flex_attention,
    flex_trainable,
    pad_batch,
    resolve_attn_implementation,
    segment_block_mask,
    uses_flex,
)
from core.packing import PAD, pack_pairs
from core.scoring import PairScorer
from tests.core.conftest import tiny_llama

pytest.importorskip("torch.nn.attention.flex_attention")


class _Pair:
    def __init__(self, prompt: list[int], chosen: list[int], rejected: list[int]) -> None:
        self.prompt_ids, self.chosen_ids, self.rejected_ids = prompt, chosen, rejected


def _pairs(seed: int, vocab: int) -> list[_Pair]:
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    return [_Pair(ids(3 + 4 * k), ids(9 - 2 * k), ids(2 + 3 * k)) for k in range(4)]


def _models(attn: str = "sdpa"):
    dense = tiny_llama(attn)
    flex = copy.deepcopy(dense)
    flex.set_attn_implementation(FLEX)
    return dense, flex


def _scores_and_grads(model, batch):
    model.zero_grad()
    scores = PairScorer(model, chunk_size=5)(batch)
    (scores.chosen_logps.sum() - 0.5 * scores.rejected_logps.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return scores, grads


@pytest.mark.parametrize("dense_attn", ["sdpa", "eager"])
def test_flex_path_matches_dense_mask_in_logps_and_gradients(dense_attn: str) -> None:
    dense, flex = _models(dense_attn)
    assert uses_flex(flex) and not uses_flex(dense)
    batch = pack_pairs(_pairs(1, 97), indices=range(4))
    dense_scores, dense_grads = _scores_and_grads(dense, batch)
    with eager_flex_attention():
        flex_scores, flex_grads = _scores_and_grads(flex, batch)
    # fp32 on CPU: the two kernels sum in different orders, so agreement is to rounding (1e-5), not bitwise
    for name in ("chosen_logps", "rejected_logps", "chosen_logits_mean", "rejected_logits_mean"):
        torch.testing.assert_close(
            getattr(flex_scores, name), getattr(dense_scores, name), atol=1e-5, rtol=1e-5
        )
    assert dense_scores.chosen_logps.abs().min() > 1.0  # real log-probs, not zeros
    with torch.no_grad(), eager_flex_attention():  # no grad: torch's own CPU flex_attention kernel
        kernel_scores = PairScorer(flex, chunk_size=5)(batch)
    torch.testing.assert_close(
        kernel_scores.chosen_logps, dense_scores.chosen_logps.detach(), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        kernel_scores.rejected_logps, dense_scores.rejected_logps.detach(), atol=1e-5, rtol=1e-5
    )
    for name, grad in dense_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(flex_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_block_mask_is_the_dense_mask_with_padding_rows_blocked() -> None:
    batch = pad_batch(pack_pairs(_pairs(2, 50), indices=range(4)), 128)
    dense_allowed = batch.attention_mask(torch.float32)[:, 0] == 0
    block = segment_block_mask(batch.segments).to_dense()  # [B, 1, T/128, T/128] block occupancy
    assert block.shape[-1] == 1 and bool(block.all())  # one 128-token block per row, partially used
    from torch.nn.attention.flex_attention import create_mask

    seg = batch.segments
    mask_mod = segment_block_mask(seg).mask_mod
    dense_from_mod = create_mask(mask_mod, seg.shape[0], None, seg.shape[1], seg.shape[1], device="cpu")[:, 0]
    padding_query = (seg == PAD)[:, :, None].expand_as(dense_allowed)
    assert torch.equal(dense_from_mod, dense_allowed & ~padding_query)


def test_bucketing_rebases_source_indices_and_keeps_tokens() -> None:
    batch = pack_pairs(_pairs(3, 50), indices=range(4))
    t = batch.input_ids.shape[1]
    wide = pad_batch(batch, bucket_length(t))
    assert wide.input_ids.shape[1] == 128 and bucket_length(129) == 256
    flat_old = batch.input_ids.reshape(-1)[batch.source_index]
    flat_new = wide.input_ids.reshape(-1)[wide.source_index]
    assert torch.equal(flat_old, flat_new) and wide.num_tokens == batch.num_tokens
    with pytest.raises(ValueError, match="cannot pad"):
        pad_batch(wide, t)


def test_auto_is_flex_on_cuda_and_sdpa_on_cpu() -> None:
    assert resolve_attn_implementation("auto", "cpu") == "sdpa"
    assert resolve_attn_implementation("auto", "cuda:0") == FLEX
    assert resolve_attn_implementation("eager", "cuda") == "eager"
    assert resolve_attn_implementation(FLEX, "cuda") == FLEX
    assert resolve_attn_implementation(FLEX, "cpu") == "sdpa"  # torch has no CPU flex backward


def test_load_model_keeps_sdpa_on_cpu_even_when_flex_is_asked(tiny_model_dir) -> None:
    from core.models import load_model
    from core.spec import ModelSpec

    for requested in ("auto", FLEX):
        model = load_model(ModelSpec(path=str(tiny_model_dir), attn_implementation=requested))
        assert model.config._attn_implementation == "sdpa" and not uses_flex(model)
    assert ModelSpec(path="x").attn_implementation == "auto"


def test_models_with_attention_dropout_are_not_trained_with_flex() -> None:
    from transformers import GPT2Config, LlamaConfig

    assert flex_trainable(LlamaConfig())  # attention_dropout 0.0
    assert not flex_trainable(LlamaConfig(attention_dropout=0.1))
    assert not flex_trainable(GPT2Config())  # attn_pdrop 0.1


def test_auto_falls_back_to_sdpa_when_the_model_cannot_load_with_flex(tiny_model_dir, monkeypatch) -> None:
    import core.models
    from core.spec import ModelSpec

    def unsupported(requested: str, device: object) -> str:  # as if "auto" chose a kernel the model lacks
        return "no_such_attention" if requested == "auto" else requested

    monkeypatch.setattr(core.models, "resolve_attn_implementation", unsupported)
    model = core.models.load_model(ModelSpec(path=str(tiny_model_dir)))
    assert model.config._attn_implementation == "sdpa"

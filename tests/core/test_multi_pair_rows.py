"""Several pairs per packed row score, lose and differentiate exactly like one pair per row (SDPA and flex)."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError

from core.attention import FLEX, eager_flex_attention, pad_batch, segment_block_mask
from core.data.batching import plan_rows
from core.losses import WeightedLoss
from core.packing import CHOSEN, PAD, PROMPT, REJECTED, RowLayout, pack_pairs, pair_width
from core.reference import compute_reference
from core.scoring import PairScorer, scorer_for
from core.spec import TrainingSpec
from tests.core.conftest import tiny_llama


class _Pair:
    def __init__(self, prompt: list[int], chosen: list[int], rejected: list[int]) -> None:
        self.prompt_ids, self.chosen_ids, self.rejected_ids = prompt, chosen, rejected


def _pairs(seed: int, vocab: int = 97) -> list[_Pair]:
    """Eight pairs of mixed widths (11 to 44 tokens) and one of 70 tokens, longer than the rows below."""
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(1, vocab, (n,), generator=g).tolist()

    pairs = [_Pair(ids(3 + 3 * (k % 4)), ids(4 + k), ids(2 + 2 * (k % 3))) for k in range(8)]
    pairs.insert(5, _Pair(ids(30), ids(25), ids(15)))
    return pairs


MAX_LENGTH = 56  # the 70-token pair has a row to itself, every other row holds several pairs


def _model(attn: str = "sdpa"):
    return tiny_llama(attn)


def _loss_and_grads(model, batch):
    """DPO + IPO loss (IPO uses the completion lengths) against a fixed fake reference, its scores and every parameter's gradient."""
    model.zero_grad()
    scores = PairScorer(model, chunk_size=7)(batch)
    b = batch.num_pairs
    ref_c, ref_r = -torch.arange(b, dtype=torch.float32), -2.0 * torch.arange(b, dtype=torch.float32)
    per_pair = WeightedLoss(("sigmoid", "ipo"), (1.0, 0.5), 0.1, {})(
        scores.chosen_logps,
        scores.rejected_logps,
        ref_c,
        ref_r,
        chosen_lengths=batch.chosen_lengths,
        rejected_lengths=batch.rejected_lengths,
    )
    loss = per_pair.mean()
    loss.backward()
    return scores, per_pair.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(got, want, atol: float = 1e-5) -> None:
    (scores_g, loss_g, grads_g), (scores_w, loss_w, grads_w) = got, want
    for name in ("chosen_logps", "rejected_logps", "chosen_logits_mean", "rejected_logits_mean"):
        torch.testing.assert_close(getattr(scores_g, name), getattr(scores_w, name), atol=atol, rtol=1e-5)
    torch.testing.assert_close(loss_g, loss_w, atol=atol, rtol=1e-5)
    assert scores_w.chosen_logps.abs().min() > 1.0  # real log-probs, not zeros
    for name, grad in grads_w.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_g[name], grad, atol=atol, rtol=1e-4, msg=name)


# ----- the row planner ---------------------------------------------------------------------------------
def test_rows_stay_within_max_length_and_place_every_pair_once() -> None:
    widths = [pair_width(p) for p in _pairs(0)]
    for per_row in (2, 3, None):
        rows = plan_rows(widths, MAX_LENGTH, per_row)
        assert sorted(i for r in rows for i in r) == list(range(len(widths)))
        for row in rows:
            assert row == sorted(row)
            assert per_row is None or len(row) <= per_row
            assert sum(widths[i] for i in row) <= MAX_LENGTH or len(row) == 1
        assert [5] in rows and widths[5] > MAX_LENGTH  # too long to share: alone, as today
        assert len(rows) < len(widths)
    assert len(plan_rows(widths, MAX_LENGTH, None)) < len(plan_rows(widths, MAX_LENGTH, 2))


def test_rows_never_pad_more_than_one_pair_per_row() -> None:
    import random

    def round_up(n: int, multiple: int) -> int:
        return -(-n // multiple) * multiple

    rng = random.Random(0)
    for _ in range(200):
        widths = [rng.randint(5, 300) for _ in range(rng.randint(1, 16))]
        max_length = rng.randint(64, 700)
        for per_row in (2, 4, None):
            for multiple in (1, 128):
                rows = plan_rows(widths, max_length, per_row, multiple=multiple)
                assert sorted(i for r in rows for i in r) == list(range(len(widths)))
                row_widths = [sum(widths[i] for i in r) for r in rows]
                assert all(w <= max_length or len(r) == 1 for w, r in zip(row_widths, rows, strict=True))
                slots = len(rows) * round_up(max(row_widths), multiple)
                assert slots <= len(widths) * round_up(max(widths), multiple)


def test_pairs_share_rows_where_that_saves_padded_slots() -> None:
    assert plan_rows([30, 10, 10, 10], 40, None) == [[0], [1, 2, 3]]  # 2 rows of 30, not 4
    assert plan_rows([30, 10, 10, 10], 40, 2) == [[0, 1], [2, 3]]  # 2 rows of 40, not 3 of 30
    # equal widths: no padding to save on dense attention, so rows stay short ...
    assert plan_rows([10] * 8, 40, None) == [[i] for i in range(8)]
    # ... but rows padded to 128-token blocks (FlexAttention) hold as many as fit
    assert plan_rows([10] * 8, 40, None, multiple=128) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert plan_rows([10] * 8, 40, 2, multiple=128) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert plan_rows([10] * 8, 15, None, multiple=128) == [[i] for i in range(8)]  # nothing fits twice


def test_one_pair_per_row_is_todays_layout() -> None:
    pairs = _pairs(1)
    assert plan_rows([pair_width(p) for p in pairs], MAX_LENGTH, 1) == [[i] for i in range(len(pairs))]
    plain, layout = pack_pairs(pairs, range(9)), RowLayout(1, MAX_LENGTH).pack(pairs, range(9))
    for name in ("input_ids", "position_ids", "segments", "source_index", "target_ids", "sequence_index"):
        assert torch.equal(getattr(plain, name), getattr(layout, name)), name
    assert bool((plain.documents[plain.segments != PAD] == 0).all())


def test_bad_row_plans_are_refused() -> None:
    pairs = _pairs(2)[:3]
    with pytest.raises(ValueError, match="exactly once"):
        pack_pairs(pairs, range(3), rows=[[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="exactly once"):
        pack_pairs(pairs, range(3), rows=[[0, 1]])
    with pytest.raises(ValueError, match="pairs_per_row"):
        plan_rows([3, 4], 10, 0)


# ----- the packed layout -------------------------------------------------------------------------------
def test_two_pairs_in_one_row_restart_positions_and_never_see_each_other() -> None:
    a, b = _Pair([1, 2, 3], [4, 5], [6]), _Pair([7], [8], [9, 10])
    batch = pack_pairs([a, b], [40, 41], rows=[[0, 1]])
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 1, 2]]
    assert batch.documents.tolist() == [[0] * 6 + [1] * 4]
    assert (
        batch.segments.tolist()[0]
        == [PROMPT] * 3 + [CHOSEN] * 2 + [REJECTED, PROMPT, CHOSEN] + [REJECTED] * 2
    )
    allowed = batch.attention_mask(torch.float32)[0, 0] == 0
    assert allowed[6].tolist() == [False] * 6 + [True] + [False] * 3  # b's prompt sees only itself
    assert allowed[9].tolist() == [False] * 6 + [True, False, True, True]  # b's rejected: b's prompt + itself
    assert allowed[5].tolist() == [True, True, True, False, False, True] + [False] * 4
    # per-pair tensors in batch order: b's first chosen token is predicted from b's prompt end (col 6)
    assert batch.source_index.tolist()[:3] == [2, 3, 6] and batch.target_ids.tolist()[:3] == [4, 5, 8]
    assert batch.sequence_index.tolist() == [0, 0, 1, 2, 3, 3]
    assert batch.example_index.tolist() == [40, 41] and batch.num_pairs == 2


def test_padding_sees_nothing_but_itself_and_block_mask_matches_dense_mask() -> None:
    from torch.nn.attention.flex_attention import create_mask

    pairs = _pairs(3)
    batch = RowLayout(None, MAX_LENGTH).pack(pairs, range(len(pairs)))
    assert batch.input_ids.shape[0] < len(pairs) and batch.input_ids.shape[1] == max(map(pair_width, pairs))
    wide = pad_batch(batch, 128)
    allowed = wide.attention_mask(torch.float32)[:, 0] == 0
    pad = wide.segments == PAD
    assert torch.equal(allowed[pad], torch.eye(128, dtype=torch.bool)[None].expand_as(allowed)[pad])
    mask_mod = segment_block_mask(wide.segments, wide.documents).mask_mod
    seg = wide.segments
    from_mod = create_mask(mask_mod, seg.shape[0], None, seg.shape[1], seg.shape[1], device="cpu")[:, 0]
    assert torch.equal(from_mod, allowed & ~pad[:, :, None])
    cross = wide.documents[:, :, None] != wide.documents[:, None, :]
    assert not bool((from_mod & cross).any()) and bool(cross[~pad].any())


# ----- scores, loss and gradients ----------------------------------------------------------------------
@pytest.mark.parametrize("per_row", [2, None])
def test_several_pairs_per_row_equal_one_pair_per_row_with_sdpa(per_row) -> None:
    model = _model("sdpa")
    pairs = _pairs(4)
    one = pack_pairs(pairs, range(len(pairs)))
    several = RowLayout(per_row, MAX_LENGTH).pack(pairs, range(len(pairs)))
    assert several.input_ids.shape[0] < one.input_ids.shape[0]
    _assert_same(_loss_and_grads(model, several), _loss_and_grads(model, one))


def test_several_pairs_per_row_on_the_flex_path_equal_one_pair_per_row_dense() -> None:
    dense = _model("sdpa")
    flex = copy.deepcopy(dense)
    flex.set_attn_implementation(FLEX)
    pairs = _pairs(5)
    one = pack_pairs(pairs, range(len(pairs)))
    several = RowLayout(None, MAX_LENGTH).pack(pairs, range(len(pairs)))
    want = _loss_and_grads(dense, one)
    with eager_flex_attention():
        got = _loss_and_grads(flex, several)
        with torch.no_grad():  # torch's own CPU flex kernel (no autograd there)
            kernel = PairScorer(flex.eval())(several)
    _assert_same(got, want)
    torch.testing.assert_close(kernel.chosen_logps, want[0].chosen_logps.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernel.rejected_logps, want[0].rejected_logps.detach(), atol=1e-5, rtol=1e-5)


def test_hh_pairs_packed_several_per_row_score_as_one_per_row(tiny_model_dir) -> None:
    from core.data import prepare_data
    from core.models import load_model, load_tokenizer
    from core.spec import DatasetSpec
    from tests.conftest import HH_FILE

    tok = load_tokenizer(str(tiny_model_dir))
    pairs = prepare_data(DatasetSpec(train=str(HH_FILE), max_rows=12), tok, 512, seed=0).train
    model = load_model(str(tiny_model_dir)).eval()
    layout = RowLayout(None, 512)
    several = layout.pack(pairs, range(len(pairs)), pad_id=tok.pad_token_id)
    assert several.input_ids.shape[0] < len(pairs) and several.input_ids.shape[1] <= 512
    with torch.no_grad():
        want = PairScorer(model)(pack_pairs(pairs, range(len(pairs)), pad_id=tok.pad_token_id))
        got = PairScorer(model)(several)
    torch.testing.assert_close(got.chosen_logps, want.chosen_logps, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got.rejected_logps, want.rejected_logps, atol=1e-4, rtol=1e-5)


# ----- the knob: spec, scorer and the reference pass ---------------------------------------------------
def test_spec_knob_reaches_the_scorer_layout_and_bad_values_name_the_field() -> None:
    model = _model()
    assert scorer_for(model, TrainingSpec(), "cpu").layout == RowLayout(1, 512)
    assert scorer_for(model, TrainingSpec(pairs_per_row="auto", max_length=64), "cpu").layout == RowLayout(
        None, 64
    )
    assert scorer_for(model, TrainingSpec(pairs_per_row=3), "cpu").layout.pairs_per_row == 3
    flex = copy.deepcopy(model)
    flex.set_attn_implementation(FLEX)
    assert scorer_for(flex, TrainingSpec(pairs_per_row=2), "cpu").layout == RowLayout(2, 512, 128)
    for bad in (0, -1, 5000, "all", "2", 1.5, True):
        with pytest.raises(ValidationError) as err:
            TrainingSpec(pairs_per_row=bad)
        assert {e["loc"][0] for e in err.value.errors()} == {"pairs_per_row"}


def test_reference_pass_with_several_pairs_per_row_fills_the_same_table() -> None:
    model = _model().eval()
    pairs = _pairs(6)
    batches = [[8, 0, 3, 5], [1, 2, 4, 6, 7]]  # indices out of order, the long pair among them
    plain = compute_reference(PairScorer(model), pairs, batches, device="cpu", pad_id=0)
    packed_scorer = PairScorer(model, layout=RowLayout(None, MAX_LENGTH))
    packed = compute_reference(packed_scorer, pairs, batches, device="cpu", pad_id=0)
    assert plain.chosen.abs().min() > 1.0
    torch.testing.assert_close(packed.chosen, plain.chosen, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.rejected, plain.rejected, atol=1e-5, rtol=1e-5)

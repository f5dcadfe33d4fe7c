"""SFT jobs (`loss: {type: sft}` alone) in-process: no reference, chosen-only rows, exact NLL, held-out NLL falls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from core import reference, reference_source, training
from core.data import LengthGroupedBatches, prepare_data
from core.models import load_model, load_tokenizer
from core.packing import CHOSEN, PAD, PROMPT, REJECTED, RowLayout
from core.scoring import PairScorer
from core.sft import SFT_METRIC_NAMES, SftLoss, pack_chosen
from core.spec import JobSpec, error_lines
from core.training import RunOptions, Trainer, train
from tests.conftest import HH_FILE, REPO
from tests.core.test_training import Recorder, make_spec

SFT = {"type": "sft"}


def _no_reference(*_: Any, **__: Any) -> Any:
    raise AssertionError("an sft job must not build or compute a reference")


def _pairs(model_dir: Path, count: int, max_length: int = 96) -> list[Any]:
    spec = make_spec(model_dir, HH_FILE, loss=SFT, max_length=max_length, dataset={"max_rows": count})
    tokenizer = load_tokenizer(spec.model)
    return prepare_data(spec.dataset, tokenizer, max_length, 0).train


def _hand_nll(model: torch.nn.Module, pairs: list[Any]) -> torch.Tensor:
    """Σ −log p(chosen token | prompt, earlier chosen) / Σ chosen tokens, from plain causal forwards."""
    total, tokens = torch.zeros(()), 0
    for p in pairs:
        ids = torch.tensor([[*p.prompt_ids, *p.chosen_ids]])
        logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        token_logps = logps.gather(1, ids[0, 1:, None])[:, 0]
        total = total - token_logps[-len(p.chosen_ids) :].sum()
        tokens += len(p.chosen_ids)
    return total / tokens


def test_sft_run_has_no_reference_pass(tiny_model_dir, tmp_path, monkeypatch):
    """Neither the reference builder nor the reference pass runs, no cache is written, the metrics are SFT's."""
    monkeypatch.setattr(training, "build_reference", _no_reference)
    monkeypatch.setattr(reference_source, "compute_reference", _no_reference)
    monkeypatch.setattr(reference, "compute_reference", _no_reference)
    monkeypatch.setattr(reference_source.ReferenceSource, "logps", _no_reference)
    spec = make_spec(
        tiny_model_dir, HH_FILE, loss=SFT, dataset={"max_rows": 24, "eval_fraction": 0.25}, max_steps=2
    )
    rec = Recorder()
    cache = tmp_path / "cache"
    res = train(spec, RunOptions(output_dir=tmp_path / "run", cache_dir=cache), rec)
    assert res.status == "completed" and res.step == 2
    assert "reference" not in rec.kinds()
    assert not cache.exists() and not (tmp_path / "run" / "cache").exists()
    row = [v for _, v in rec.rows if "loss" in v][-1]
    for name in (*SFT_METRIC_NAMES, "learning_rate", "grad_norm", "num_tokens", "padding_fraction"):
        assert name in row, name
    assert row["nll"] == row["loss"] > 0
    assert not {"rewards/chosen", "logps/rejected", "rewards/accuracies"} & set(row)
    assert set(res.eval_metrics) == {f"eval/{n}" for n in SFT_METRIC_NAMES}
    # the first step packed the prompt and chosen tokens of its batch, no rejected ones
    train_pairs = prepare_data(spec.dataset, load_tokenizer(spec.model), 256, 0).train
    first = LengthGroupedBatches([p.length for p in train_pairs], 8, 0).epoch(0)[0]
    step_one = next(v for s, v in rec.rows if s == 1 and "loss" in v)
    assert step_one["num_tokens"] == sum(
        len(train_pairs[i].prompt_ids) + len(train_pairs[i].chosen_ids) for i in first
    )


def test_sft_lowers_held_out_nll(tiny_model_dir, tmp_path):
    spec = make_spec(
        tiny_model_dir,
        HH_FILE,
        loss=SFT,
        dataset={"max_rows": 48, "eval_fraction": 0.25},
        learning_rate=1e-2,
        lr_scheduler="constant",
        max_steps=8,
        max_length=128,
    )
    trainer = Trainer(spec, RunOptions(output_dir=tmp_path / "run"))
    setup = trainer.setup()
    before = trainer.evaluate(setup)
    res = trainer.train_loop(setup)
    assert res.status == "completed"
    after = res.eval_metrics
    assert after["eval/nll"] == after["eval/loss"]
    assert after["eval/nll"] < before["eval/nll"] - 0.5, (before, after)
    assert after["eval/logps/chosen"] > before["eval/logps/chosen"]


@pytest.mark.parametrize("pairs_per_row", [1, "auto"])
def test_sft_loss_equals_hand_computation(tiny_model_dir, pairs_per_row):
    """Loss, reported NLL and one weight's gradient match log-softmax + gather over plain causal forwards."""
    pairs = _pairs(tiny_model_dir, 4)
    model = load_model(str(tiny_model_dir)).train()
    layout = RowLayout(None if pairs_per_row == "auto" else pairs_per_row, 512)
    batch = pack_chosen(pairs, range(len(pairs)), 0, layout)
    if pairs_per_row == "auto":
        assert batch.input_ids.shape[0] < len(pairs)  # several pairs share a row
    sft = SftLoss()
    loss, values = sft(PairScorer(model), batch, reference_source.ReferenceSource(torch.device("cpu")))
    weight = model.get_output_embeddings().weight
    (got_grad,) = torch.autograd.grad(loss, weight)
    expected = _hand_nll(model, pairs)
    (want_grad,) = torch.autograd.grad(expected, weight)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-7)
    sums = sft.new_sums()
    sums.add(values)
    reported = sums.reduce()
    assert reported["nll"] == pytest.approx(expected.item(), rel=1e-5)
    assert reported["logps/chosen"] * len(pairs) == pytest.approx(
        -expected.item() * batch.chosen_lengths.sum().item(), rel=1e-5
    )


def test_pack_chosen_holds_no_rejected_tokens(tiny_model_dir):
    pairs = _pairs(tiny_model_dir, 3)
    batch = pack_chosen(pairs, [5, 6, 7], 0, RowLayout())
    assert not (batch.segments == REJECTED).any()
    assert batch.num_tokens == sum(len(p.prompt_ids) + len(p.chosen_ids) for p in pairs)
    for row, p in enumerate(pairs):
        assert (batch.segments[row] == PROMPT).sum() == len(p.prompt_ids)
        assert (batch.segments[row] == CHOSEN).sum() == len(p.chosen_ids)
        assert batch.input_ids[row, batch.segments[row] != PAD].tolist() == [*p.prompt_ids, *p.chosen_ids]
    assert batch.target_ids.tolist() == [t for p in pairs for t in p.chosen_ids]
    assert batch.rejected_lengths.tolist() == [0, 0, 0] and batch.example_index.tolist() == [5, 6, 7]


def _spec(loss: dict[str, Any], **training_: Any) -> JobSpec:
    return JobSpec.model_validate(
        {"name": "t", "model": "m", "dataset": {"train": "d.jsonl"}, "loss": loss, "training": training_}
    )


def test_spec_accepts_sft_and_refuses_what_cannot_apply():
    assert _spec(SFT).loss.is_sft
    assert _spec({"type": ["sft"], "weights": [1.0]}).loss.is_sft
    assert _spec({"type": "sft", "beta": 0.5}).loss.is_sft  # hyperparameters sft does not read are ignored
    assert not _spec({"type": ["sigmoid", "sft"], "weights": [1.0, 0.5]}).loss.is_sft
    assert not _spec({"type": ["sigmoid", "sft"]}, precompute_ref_logps=False).loss.is_sft
    for loss, training_, field in (
        ({"type": ["sft"], "weights": [2.0]}, {}, "loss.weights"),
        (SFT, {"precompute_ref_logps": False}, "training.precompute_ref_logps"),
    ):
        with pytest.raises(ValidationError) as err:
            _spec(loss, **training_)
        assert field in " ".join(error_lines(err.value)), error_lines(err.value)


def test_docs_describe_sft_jobs():
    losses_doc = (REPO / "docs" / "losses.md").read_text(encoding="utf-8")
    assert "## SFT jobs" in losses_doc
    missing = [n for n in SFT_METRIC_NAMES if f"`{n}`" not in losses_doc]
    assert not missing and "`eval/nll`" in losses_doc
    assert "token" in losses_doc.split("## SFT jobs", 1)[1].split("\n## ", 1)[0]
    assert "type: sft" in (REPO / "docs" / "job-spec.md").read_text(encoding="utf-8")

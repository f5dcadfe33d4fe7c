"""The training loop in-process: learning signal, MinorDPO's effect, exact resume, reference cache, failures, LoRA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from core import losses
from core.models import load_model, make_tiny_model
from core.reporting import NullReporter
from core.spec import JobSpec
from core.training import RunOptions, TrainingError, train
from tests.conftest import GPT2_FILE, HH_FILE


class Recorder(NullReporter):
    """Keeps every event and metric row for assertions."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.rows: list[tuple[int, dict[str, float]]] = []
        self.checkpoints: list[tuple[int, Path | None]] = []

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.events.append((kind, message, data or {}))

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.rows.append((step, dict(values)))

    def checkpoint(self, step: int, path: Path | None, values: dict[str, float]) -> None:
        self.checkpoints.append((step, path))

    def kinds(self) -> list[str]:
        return [e[0] for e in self.events]

    def last_train_step(self) -> int:
        return max((s for s, v in self.rows if "loss" in v), default=0)


def make_spec(model: Path, data: Path, **training: Any) -> JobSpec:
    loss = training.pop("loss", {"type": "sigmoid", "beta": 0.1})
    dataset = {"max_rows": 64, **training.pop("dataset", {})}
    lora = training.pop("lora", None)
    return JobSpec.model_validate(
        {
            "name": "test",
            "model": str(model),
            "dataset": {"train": str(data), **dataset},
            "loss": loss,
            "lora": lora,
            "training": {
                "batch_size": 8,
                "max_length": 256,
                "learning_rate": 1e-3,
                "max_steps": 4,
                **training,
            },
        }
    )


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def ref_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Reference tables shared by the tests of this module (the cache itself is tested separately)."""
    return tmp_path_factory.mktemp("ref-cache")


@pytest.mark.slow
def test_learns_preferences_and_minor_dpo_keeps_chosen_up(
    tiny_model_dir, learnable_pairs_file, tmp_path, ref_cache
):
    """Held-out accuracy rises for both losses; at a high LR MinorDPO ends with higher logps/chosen (the paper's effect)."""
    results = {}
    for loss in ("sigmoid", "minor_dpo"):
        spec = make_spec(
            tiny_model_dir,
            learnable_pairs_file,
            loss={"type": loss, "beta": 0.1},
            dataset={"eval_fraction": 0.2, "max_rows": None},
            learning_rate=1e-2,
            max_steps=24,
        )
        results[loss] = train(spec, RunOptions(output_dir=tmp_path / loss, cache_dir=ref_cache))
    for loss, res in results.items():
        assert res.status == "completed" and res.step == 24
        assert res.eval_metrics["eval/rewards/accuracies"] >= 0.85, (loss, res.eval_metrics)
    minor, dpo = results["minor_dpo"].eval_metrics, results["sigmoid"].eval_metrics
    assert minor["eval/logps/chosen"] > dpo["eval/logps/chosen"] + 2.0, (minor, dpo)
    # DPO pushed the rejected answer further down than MinorDPO, whose gate switched off
    assert dpo["eval/logps/rejected"] < minor["eval/logps/rejected"]
    assert results["minor_dpo"].metrics["minor_dpo/reject_gate_off_frac"] > 0.5


def test_exact_resume_matches_straight_run(tiny_model_dir, learnable_pairs_file, tmp_path, ref_cache):
    spec = make_spec(
        tiny_model_dir, learnable_pairs_file, batch_size=4, max_steps=20, checkpoint_every=5, warmup_steps=3
    )
    straight = train(spec, RunOptions(output_dir=tmp_path / "straight", cache_dir=ref_cache))
    assert straight.step == 20

    rec = Recorder()
    first = train(
        spec,
        RunOptions(
            output_dir=tmp_path / "split",
            cache_dir=ref_cache,
            should_stop=lambda: rec.last_train_step() >= 10,
        ),
        rec,
    )
    assert first.status == "cancelled" and first.step == 10
    rec2 = Recorder()
    second = train(
        spec, RunOptions(output_dir=tmp_path / "split", cache_dir=ref_cache, resume_from="latest"), rec2
    )
    assert second.status == "completed" and second.step == 20
    assert "resumed" in rec2.kinds()
    assert [s for s, v in rec2.rows if "loss" in v] == list(range(11, 21))  # steps continue, none repeated

    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    assert abs(straight.metrics["loss"] - second.metrics["loss"]) < 1e-5
    # the model really moved, so equality above is not the trivial one
    start = load_model(str(tiny_model_dir)).state_dict()
    assert any(not torch.allclose(start[k], a[k]) for k in a if k in start)


def test_reference_cache_reused_and_invalidated(tiny_model_dir, learnable_pairs_file, tmp_path):
    cache = tmp_path / "cache"

    def run(model: Path, **dataset: Any) -> dict[str, Any]:
        rec = Recorder()
        spec = make_spec(model, learnable_pairs_file, max_steps=1, dataset=dataset)
        train(spec, RunOptions(output_dir=tmp_path / "run", cache_dir=cache), rec)
        return next(d for k, _, d in rec.events if k == "reference")

    first = run(tiny_model_dir, max_rows=40)
    assert first["cached"] is False
    again = run(tiny_model_dir, max_rows=40)
    assert again["cached"] is True and again["key"] == first["key"]
    other_data = run(tiny_model_dir, max_rows=48)
    assert other_data["cached"] is False and other_data["key"] != first["key"]
    other_model = make_tiny_model(tmp_path / "other", tokenizer=GPT2_FILE, size="tiny", seed=1)
    changed = run(other_model, max_rows=40)
    assert changed["cached"] is False and changed["key"] != first["key"]


def test_live_reference_matches_precomputed(tiny_model_dir, learnable_pairs_file, tmp_path, ref_cache):
    recs = {}
    for precompute in (True, False):
        rec = recs[precompute] = Recorder()
        spec = make_spec(tiny_model_dir, learnable_pairs_file, max_steps=4, precompute_ref_logps=precompute)
        train(spec, RunOptions(output_dir=tmp_path / str(precompute), cache_dir=ref_cache), rec)
        assert ("reference" in rec.kinds()) is precompute
        # lifecycle moves are the store's; the loop's first word is its own kind (a `status` event
        # would reach `minordpo watch` as a status move with no status: "None preparing ...")
        assert rec.kinds()[0] == "preparing" and "status" not in rec.kinds()
    for (s1, m1), (s2, m2) in zip(recs[True].rows, recs[False].rows, strict=True):
        assert s1 == s2
        for key in ("loss", "rewards/margins", "logps/chosen"):
            assert m1[key] == pytest.approx(m2[key], rel=1e-4, abs=1e-5)
    assert recs[True].rows[-1][1]["rewards/margins"] != 0.0


def test_non_finite_loss_fails_with_the_step(
    tiny_model_dir, learnable_pairs_file, tmp_path, monkeypatch, ref_cache
):
    real = losses.LOSSES["sigmoid"]
    calls = {"n": 0}

    def nan_on_third(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setitem(losses.LOSSES, "sigmoid", nan_on_third)
    spec = make_spec(tiny_model_dir, learnable_pairs_file, max_steps=5)
    with pytest.raises(TrainingError, match="at step 3") as info:
        train(spec, RunOptions(output_dir=tmp_path / "run", cache_dir=ref_cache))
    assert info.value.code == "non_finite_loss"


def test_lora_reference_is_base_model_and_final_model_loads(tiny_model_dir, learnable_pairs_file, tmp_path):
    rec = Recorder()
    spec = make_spec(
        tiny_model_dir,
        learnable_pairs_file,
        max_steps=3,
        learning_rate=5e-2,
        lora={"r": 4, "alpha": 8},
        checkpoint_every=2,
    )
    res = train(spec, RunOptions(output_dir=tmp_path / "run"), rec)
    first = rec.rows[0][1]
    # step 1: adapters start at zero, so the policy equals the reference and the margins are zero
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert rec.rows[-1][1]["rewards/margins"] != pytest.approx(0.0, abs=1e-6)
    assert (res.final_model_dir / "adapter" / "adapter_config.json").exists()
    merged = load_model(str(res.final_model_dir))
    base = load_model(str(tiny_model_dir))
    assert any(
        not torch.allclose(p, base.state_dict()[k])
        for k, p in merged.state_dict().items()
        if k in base.state_dict()
    )
    assert (tmp_path / "run" / "checkpoints" / "step-0000002" / "model" / "adapter_config.json").exists()


def test_hh_pairs_run_with_eval_and_checkpoints(tiny_model_dir, tmp_path):
    rec = Recorder()
    spec = make_spec(
        tiny_model_dir,
        HH_FILE,
        loss={"type": ["minor_dpo", "sft"], "weights": [1.0, 0.1], "beta": 0.1},
        dataset={"max_rows": 64, "eval_fraction": 0.25},
        max_steps=4,
        eval_every=2,
        checkpoint_every=2,
        keep_checkpoints=1,
        max_length=512,
    )
    res = train(spec, RunOptions(output_dir=tmp_path / "run"), rec)
    steps = [s for s, v in rec.rows if "loss" in v]
    assert steps == [1, 2, 3, 4]
    evals = [s for s, v in rec.rows if "eval/loss" in v]
    assert evals == [2, 4]
    assert [s for s, _ in rec.checkpoints] == [2]  # none at the final step: the final model is saved instead
    row = [v for _, v in rec.rows if "loss" in v][-1]
    for name in losses.METRIC_NAMES + (
        "learning_rate",
        "grad_norm",
        "epoch",
        "num_tokens",
        "padding_fraction",
    ):
        assert name in row
    assert 0.0 <= row["padding_fraction"] < 0.5
    assert res.report.rows_used == 64 and res.report.train_rows == 48
    assert (res.final_model_dir / "model.safetensors").exists() and (
        res.final_model_dir / "tokenizer.json"
    ).exists()

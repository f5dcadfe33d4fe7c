"""training.precision: resolution per device, bf16 autocast training on CPU against fp32, float16 refused."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from core.checkpointing import load_trainer_state
from core.precision import allow_tf32_for_fp32, autocast, compute_dtype
from core.spec import JobSpec
from core.training import RunOptions, train
from tests.core.test_training import Recorder, make_spec


def test_precision_resolves_per_device(monkeypatch):
    assert compute_dtype("auto", "cpu") == torch.float32
    assert compute_dtype("bf16", "cpu") == torch.bfloat16
    assert compute_dtype("fp32", "cuda") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert compute_dtype("auto", "cuda:0") == torch.bfloat16
    assert compute_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert compute_dtype("auto", "cuda:0") == torch.float32


def test_autocast_only_for_bf16():
    with autocast(torch.bfloat16, "cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast(torch.float32, "cpu"):
        assert not torch.is_autocast_enabled("cpu")


def test_tf32_only_for_fp32_on_cuda():
    before = torch.get_float32_matmul_precision()
    try:
        assert allow_tf32_for_fp32(torch.float32, "cpu") is False
        assert allow_tf32_for_fp32(torch.bfloat16, "cuda") is False
        assert torch.get_float32_matmul_precision() == before
        assert allow_tf32_for_fp32(torch.float32, "cuda") is True
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def _job(**training):
    return {"name": "p", "model": {"path": "m"}, "dataset": {"train": "d.jsonl"}, "training": training}


def test_spec_precision_values_and_float16_refused():
    assert JobSpec.model_validate(_job()).training.precision == "auto"
    assert JobSpec.model_validate(_job(precision="bf16")).training.precision == "bf16"
    with pytest.raises(ValidationError, match="precision"):
        JobSpec.model_validate(_job(precision="fp16"))
    job = _job()
    job["model"]["dtype"] = "float16"
    with pytest.raises(ValidationError, match=r"model\.dtype float16 cannot be trained") as info:
        JobSpec.model_validate(job)
    assert info.value.errors()[0]["loc"] == ("model",)
    job["model"]["dtype"] = "bfloat16"
    assert JobSpec.model_validate(job).model.dtype == "bfloat16"


def test_bf16_mixed_precision_tracks_fp32_with_fp32_master_weights(
    tiny_model_dir, learnable_pairs_file, tmp_path
):
    """6 steps on CPU: the bf16 loss stays within 0.005 of fp32's each step; weights and Adam state stay fp32."""
    runs = {}
    for precision in ("fp32", "bf16"):
        rec = Recorder()
        spec = make_spec(
            tiny_model_dir, learnable_pairs_file, max_steps=6, precision=precision, checkpoint_every=3
        )
        options = RunOptions(output_dir=tmp_path / precision, cache_dir=tmp_path / "cache")
        result = train(spec, options, rec)
        assert result.status == "completed"
        assert next(d for k, _, d in rec.events if k == "started")["precision"] == precision
        runs[precision] = (rec, result)
    # bf16 reference log-probs are not the fp32 ones: the cache keeps them apart
    references = [next(d for k, _, d in runs[p][0].events if k == "reference") for p in ("fp32", "bf16")]
    assert references[1]["cached"] is False and references[1]["key"] != references[0]["key"]
    fp32_rows = [v for _, v in runs["fp32"][0].rows if "loss" in v]
    bf16_rows = [v for _, v in runs["bf16"][0].rows if "loss" in v]
    assert len(fp32_rows) == len(bf16_rows) == 6
    for a, b in zip(fp32_rows, bf16_rows, strict=True):
        assert math.isfinite(b["loss"]) and math.isfinite(b["grad_norm"])
        assert abs(a["loss"] - b["loss"]) < 0.005, (a["loss"], b["loss"])
    # bf16 really ran: its log-probs are close to, but not the same as, fp32's
    chosen = [(a["logps/chosen"], b["logps/chosen"]) for a, b in zip(fp32_rows, bf16_rows, strict=True)]
    assert all(abs(x - y) < 1e-3 * abs(x) for x, y in chosen)
    assert any(x != y for x, y in chosen)
    # the loss still went down under bf16
    assert bf16_rows[-1]["loss"] < bf16_rows[0]["loss"]

    rec, _ = runs["bf16"]
    final = load_file(tmp_path / "bf16" / "final" / "model.safetensors")
    assert {t.dtype for t in final.values()} == {torch.float32}
    checkpoint = next(path for step, path in rec.checkpoints if step == 3 and path is not None)
    optimizer = load_trainer_state(checkpoint)["optimizer"]
    moments = [t for s in optimizer["state"].values() for k, t in s.items() if k.startswith("exp_avg")]
    assert moments and {t.dtype for t in moments} == {torch.float32}

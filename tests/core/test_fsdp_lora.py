"""LoRA under FSDP2 on 2 gloo ranks: the same run as LoRA under DDP, the same final folder, adapter-only
sharded checkpoints and their resume, bf16 with activation checkpointing, the live reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.models import adapters_disabled, apply_lora, load_model
from core.spec import JobSpec, LoraSpec
from tests.core.test_fsdp import (
    ATOL,
    RTOL,
    STEPS,
    assert_resume_matches,
    final_weights,
    make_spec,
    run_two_ranks,
    steps,
)

LORA = {"r": 4, "alpha": 8}


def lora_spec(model: Path, data: Path, strategy: str) -> JobSpec:
    spec = make_spec(model, data, strategy, 2)
    return JobSpec.model_validate({**spec.model_dump(), "lora": LORA})


def adapter_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, learnable_pairs_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("fsdp-lora")
    fsdp_spec = lora_spec(tiny_model_dir, learnable_pairs_file, "fsdp")
    return {
        "root": root,
        "ddp": run_two_ranks(lora_spec(tiny_model_dir, learnable_pairs_file, "ddp"), root / "ddp"),
        "fsdp": run_two_ranks(fsdp_spec, root / "fsdp"),
        "fsdp_spec": fsdp_spec,
    }


def test_fsdp_lora_equals_ddp_lora(runs: dict, tiny_model_dir: Path) -> None:
    """Same losses, gradient norms, adapters and merged weights (fp32; tolerances as in test_fsdp)."""
    root, ddp, fsdp = runs["root"], runs["ddp"][0], runs["fsdp"][0]
    assert fsdp["status"] == "completed" and sorted(steps(fsdp)) == list(range(1, STEPS + 1))
    for key in ("losses", "norms"):
        a, b = steps(fsdp, key), steps(ddp, key)
        for step in a:
            assert a[step] == pytest.approx(b[step], rel=RTOL), (key, step)
    assert steps(runs["fsdp"][1]) == steps(fsdp)
    fa, da = adapter_weights(root / "fsdp"), adapter_weights(root / "ddp")
    assert set(fa) == set(da) and fa and all("lora_" in name for name in fa)
    for name in fa:
        torch.testing.assert_close(fa[name], da[name], rtol=RTOL, atol=ATOL, msg=name)
    f, d = final_weights(root / "fsdp"), final_weights(root / "ddp")
    start = load_model(str(tiny_model_dir)).state_dict()
    assert set(f) == set(d) and set(f) <= set(start)  # merged: the base model's names, no lora_ keys
    for name in f:
        torch.testing.assert_close(f[name], d[name], rtol=RTOL, atol=ATOL, msg=name)
    assert any(not torch.allclose(start[k], f[k]) for k in f)  # the adapters moved the merged weights
    # rank 1 built the base and its adapters on meta and received rank 0's initial adapters by broadcast
    zero, one = runs["fsdp"][0]["loading"], runs["fsdp"][1]["loading"]
    assert (zero["from_pretrained"], one["from_pretrained"]) == (1, 0) and one["skeletons"] == [True]


def test_fsdp_lora_final_folder_loads_and_its_adapter_rebuilds_the_merge(
    runs: dict, tiny_model_dir: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = runs["root"] / "fsdp" / "final"
    merged = AutoModelForCausalLM.from_pretrained(folder)
    saved = final_weights(runs["root"] / "fsdp")
    state = merged.state_dict()
    for name, value in saved.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)
    rebuilt = PeftModel.from_pretrained(
        load_model(str(tiny_model_dir)), folder / "adapter"
    ).merge_and_unload()
    for name, value in rebuilt.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_fsdp_lora_sharded_checkpoint_holds_adapters_and_resumes_exactly(runs: dict) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    root, spec = runs["root"], runs["fsdp_spec"]
    first = run_two_ranks(spec, root / "split", stop_after=2)
    assert first[0]["status"] == "cancelled" and first[0]["step"] == 2
    ckpt = root / "split" / "checkpoints" / "step-0000002" / "sharded"
    saved = list(FileSystemReader(ckpt).read_metadata().state_dict_metadata)
    model_keys = [k for k in saved if k.startswith("model.")]
    assert model_keys and all("lora_" in k for k in model_keys)  # the frozen base is not written
    second = run_two_ranks(spec, root / "split", resume=True)
    assert_resume_matches(runs["fsdp"][0], second[0], root / "fsdp", root / "split")


def test_disabled_adapters_act_as_the_base_and_stay_trainable(tiny_model_dir: Path) -> None:
    """The reference context leaves what is trainable unchanged (FSDP2 fixes its gradient dtypes from the
    trainable parameters at the first forward, which can be the reference pass)."""
    base = load_model(str(tiny_model_dir))
    ids = torch.tensor([[5, 9, 2, 7, 1]])
    with torch.no_grad():
        expected = base(ids).logits
    model = apply_lora(load_model(str(tiny_model_dir)), LoraSpec(r=4))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)  # adapters that change the output
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad(), adapters_disabled(model):
        assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
        torch.testing.assert_close(model(ids).logits, expected)
    with torch.no_grad():
        with_adapters = model(ids).logits
    assert not torch.allclose(with_adapters, expected)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_fsdp_lora_bf16_with_checkpointing_tracks_fp32(runs: dict) -> None:
    """bf16 mixed precision and activation checkpointing, the reference computed in the same run: fp32
    master adapters, losses close to the fp32 run, all finite."""
    spec = runs["fsdp_spec"].model_copy(deep=True)
    spec.training.precision = "bf16"
    spec.training.gradient_checkpointing = True
    spec.training.checkpoint_every = None
    [bf16, _] = run_two_ranks(spec, runs["root"] / "bf16")
    assert bf16["reference"][0]["cached"] is False  # the reference pass ran before the first step
    fp32 = steps(runs["fsdp"][0])
    assert sorted(steps(bf16)) == sorted(fp32)
    for step, loss in steps(bf16).items():
        assert loss == pytest.approx(fp32[step], abs=5e-3), step
    adapters = adapter_weights(runs["root"] / "bf16")
    assert {v.dtype for v in adapters.values()} == {torch.float32}
    assert all(torch.isfinite(v).all() for v in adapters.values())


def test_fsdp_lora_live_reference_equals_the_precomputed_one(runs: dict) -> None:
    """precompute_ref_logps false: the sharded policy with its adapters disabled scores each batch; the
    losses equal the precomputed run's (the same base weights score the same pairs)."""
    spec = runs["fsdp_spec"].model_copy(deep=True)
    spec.training.precompute_ref_logps = False
    spec.training.checkpoint_every = None
    [live, _] = run_two_ranks(spec, runs["root"] / "live")
    assert live["reference"] == [] and [live["loading"]["from_pretrained"]] == [1]  # no copy, no table
    precomputed = steps(runs["fsdp"][0])
    assert sorted(steps(live)) == sorted(precomputed)
    for step, loss in steps(live).items():
        assert loss == pytest.approx(precomputed[step], rel=1e-5), step


def test_fsdp_lora_on_an_untied_model_with_a_live_reference_equals_one_process(
    tiny_model_dir: Path, learnable_pairs_file: Path, tmp_path: Path
) -> None:
    """LoRA over an untied Llama under FSDP, where the frozen embeddings and head are sharded by vocabulary
    rows and the live reference is the policy with its adapters disabled: the same losses and adapters as
    one process."""
    from core.models import make_tiny_model
    from core.training import RunOptions, train
    from tests.core.test_fsdp import StepRecorder

    untied = make_tiny_model(tmp_path / "untied", tokenizer=tiny_model_dir, tie_embeddings=False)
    single = StepRecorder()
    one_spec = JobSpec.model_validate(
        {**make_spec(untied, learnable_pairs_file, "ddp", 1).model_dump(), "lora": LORA}
    )
    train(one_spec, RunOptions(output_dir=tmp_path / "one"), single)
    spec = lora_spec(untied, learnable_pairs_file, "fsdp")
    spec.training.precompute_ref_logps = False
    [fsdp, _] = run_two_ranks(spec, tmp_path / "fsdp")
    by_rows = ["model.base_model.model.model.embed_tokens", "model.base_model.model.lm_head"]
    assert fsdp["loading"]["vocab_rows"] == by_rows and fsdp["reference"] == []
    assert sorted(steps(fsdp)) == sorted(single.losses) == list(range(1, STEPS + 1))
    for step, loss in steps(fsdp).items():
        assert loss == pytest.approx(single.losses[step], rel=RTOL), step
    fa, sa = adapter_weights(tmp_path / "fsdp"), adapter_weights(tmp_path / "one")
    assert set(fa) == set(sa) and fa
    for name in fa:
        torch.testing.assert_close(fa[name], sa[name], rtol=RTOL, atol=1e-5, msg=name)

"""training.gradient_checkpointing: decoder layers recompute in backward, with the same loss and gradients."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from core import policy_loading
from core.models import apply_lora, causal_lm, enable_activation_checkpointing, load_model
from core.packing import pack_pairs
from core.scoring import PairScorer
from core.spec import LoraSpec
from core.training import RunOptions, train
from tests.core.test_scoring_chunked import _pairs
from tests.core.test_training import Recorder, make_spec


def _step(model: torch.nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Loss, gradients and how often the first decoder layer's MLP ran in one forward + backward."""
    calls = []
    mlp = causal_lm(model).get_decoder().layers[0].mlp
    forward = type(mlp).forward

    def counted(self, *args, **kwargs):  # module hooks do not run in the recompute, so wrap forward
        calls.append(1)
        return forward(self, *args, **kwargs)

    mlp.forward = counted.__get__(mlp)
    model.zero_grad(set_to_none=True)
    scores = PairScorer(model)(batch)
    loss = -torch.nn.functional.logsigmoid(scores.chosen_logps - scores.rejected_logps).mean()
    loss.backward()
    del mlp.forward
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, len(calls)


@pytest.mark.parametrize("lora", [False, True])
def test_checkpointing_recomputes_layers_with_same_loss_and_gradients(tiny_model_dir, lora):
    """Tolerance: 1e-6 absolute on the loss, 1e-6 relative to each gradient's largest entry (fp32)."""
    model = load_model(str(tiny_model_dir)).train()
    if lora:
        model = apply_lora(model, LoraSpec(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    pairs = _pairs(seed=2, vocab=model.get_input_embeddings().weight.shape[0])
    batch = pack_pairs(pairs, range(len(pairs)))

    plain_loss, plain_grads, plain_calls = _step(model, batch)
    enable_activation_checkpointing(model)
    ckpt_loss, ckpt_grads, ckpt_calls = _step(model, batch)

    assert plain_calls == 1 and ckpt_calls == 2  # the layer ran again in backward
    assert abs(float(plain_loss - ckpt_loss)) < 1e-6
    assert plain_grads.keys() == ckpt_grads.keys() and plain_grads
    if lora:
        assert all("lora_" in name for name in plain_grads)
    for name, grad in plain_grads.items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(ckpt_grads[name], grad, atol=1e-6 * scale, rtol=1e-6, msg=name)
    # eval / no-grad passes (the reference) are not recomputed
    model.eval()
    with torch.no_grad():
        PairScorer(model)(batch)


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8}])
def test_training_with_checkpointing_equals_training_without(
    tiny_model_dir, learnable_pairs_file, tmp_path, monkeypatch, lora
):
    """3 steps, fp32: every step's loss within 1e-5 and the final weights within 1e-5 relative."""
    enabled: list[torch.nn.Module] = []

    def spy(model: torch.nn.Module) -> None:
        enabled.append(model)
        enable_activation_checkpointing(model)

    monkeypatch.setattr(policy_loading, "enable_activation_checkpointing", spy)
    rows = {}
    for flag in (False, True):
        rec = Recorder()
        spec = make_spec(
            tiny_model_dir,
            learnable_pairs_file,
            max_steps=3,
            learning_rate=1e-2,
            gradient_checkpointing=flag,
            lora=lora,
        )
        assert train(spec, RunOptions(output_dir=tmp_path / str(flag)), rec).status == "completed"
        rows[flag] = [v for _, v in rec.rows if "loss" in v]
        assert len(enabled) == int(flag)
    assert len(enabled) == 1
    assert all(layer.gradient_checkpointing for layer in causal_lm(enabled[0]).get_decoder().layers)
    for a, b in zip(rows[False], rows[True], strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4
    assert rows[False][-1]["loss"] < rows[False][0]["loss"]
    a = load_file(tmp_path / "False" / "final" / "model.safetensors")
    b = load_file(tmp_path / "True" / "final" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)

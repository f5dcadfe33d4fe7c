"""The policy a run trains: pretrained, with LoRA adapters, or a checkpoint's model folder; activation checkpointing."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from core.checkpointing import is_sharded_checkpoint
from core.models import apply_lora, enable_activation_checkpointing, load_lora_checkpoint, load_model
from core.run_context import TrainingError
from core.spec import JobSpec


def load_policy(
    spec: JobSpec, checkpoint: Path | None, *, device: torch.device, allow_remote_code: bool
) -> nn.Module:
    """The pretrained model (with fresh adapters under ``lora``), or a checkpoint's model folder.

    A sharded checkpoint holds no model folder: the pretrained weights are loaded and its shards are
    loaded into them once the model is sharded.
    """
    if checkpoint is None or is_sharded_checkpoint(checkpoint):
        policy = load_model(spec.model, allow_remote_code=allow_remote_code, device=device)
        return apply_lora(policy, spec.lora) if spec.lora else policy
    if spec.lora:
        base = load_model(spec.model, allow_remote_code=allow_remote_code, device=device)
        return load_lora_checkpoint(base, checkpoint / "model").to(device)
    return load_model(
        spec.model, allow_remote_code=allow_remote_code, device=device, path_override=checkpoint / "model"
    )


def enable_checkpointing(policy: nn.Module) -> None:
    """``training.gradient_checkpointing``: recompute activations in backward, or a clear failure."""
    try:
        enable_activation_checkpointing(policy)
    except ValueError as exc:
        raise TrainingError(
            "gradient_checkpointing_unsupported",
            f"training.gradient_checkpointing is not supported by this model: {exc}",
        ) from exc

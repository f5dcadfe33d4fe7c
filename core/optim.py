"""Optimizer and learning-rate schedule of a run (AdamW, warmup + linear/cosine/constant, as in HF/TRL)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from core.spec import TrainingSpec

FUSED_DEVICES = ("cpu", "cuda")
SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def build_optimizer(model: nn.Module, t: TrainingSpec) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases and norms (1-D parameters).

    The fused kernel (transformers' default optimizer with this torch, so TRL runs match) where every
    parameter is a float tensor on a device it supports: one pass per parameter, no temporaries the size
    of the model (the foreach kernel's), which sets the peak memory of DDP steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_epsilon,
        fused=all(p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params) or None,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainingSpec, total_steps: int) -> Any:
    """Warmup then decay, stepped once per optimizer step (transformers' schedules, so TRL runs match)."""
    from transformers import get_scheduler

    return get_scheduler(
        SCHEDULERS[t.lr_scheduler], optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=total_steps
    )

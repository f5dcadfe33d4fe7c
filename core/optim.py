"""Optimizer and learning-rate schedule of a run (AdamW, warmup + linear/cosine/constant, as in HF/TRL)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from core.spec import TrainingSpec

SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def build_optimizer(model: nn.Module, t: TrainingSpec) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases and norms (1-D parameters)."""
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
    )


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainingSpec, total_steps: int) -> Any:
    """Warmup then decay, stepped once per optimizer step (transformers' schedules, so TRL runs match)."""
    from transformers import get_scheduler

    return get_scheduler(
        SCHEDULERS[t.lr_scheduler], optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=total_steps
    )

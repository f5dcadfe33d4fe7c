"""Training precision: `training.precision` to a compute dtype, the autocast context, TF32 for fp32 on CUDA.

The parameters keep the dtype they were loaded in (``model.dtype``, float32 by default: the fp32 master
weights); ``bf16`` runs the forward under ``torch.autocast`` so matmuls are bf16 while the optimizer,
the gradients' accumulation and the log-softmax / loss (core.scoring, core.losses) stay fp32.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16"]


def compute_dtype(precision: Precision, device: torch.device | str) -> torch.dtype:
    """bf16 or fp32; ``auto`` is bf16 on a CUDA device that supports it and fp32 elsewhere (CPU)."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32":
        return torch.float32
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast(dtype: torch.dtype, device: torch.device | str) -> AbstractContextManager[object]:
    """``torch.autocast`` to ``dtype`` on the device's type, or a no-op for fp32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def allow_tf32_for_fp32(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Let fp32 matmuls use TF32 tensor cores on CUDA (process-wide); nothing on CPU. True when set."""
    if dtype != torch.float32 or torch.device(device).type != "cuda":
        return False
    torch.set_float32_matmul_precision("high")
    return True

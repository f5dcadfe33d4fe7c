"""Attention for packed `[prompt; chosen; rejected]` rows: dense additive mask (SDPA/eager) or a FlexAttention BlockMask.

``model.attn_implementation: auto`` (the default) loads the model with ``flex_attention`` on CUDA and
``sdpa`` elsewhere. With ``flex_attention`` the packed rows are padded to a multiple of
``FLEX_BUCKET`` tokens (fewer distinct shapes, so fewer recompiles of the compiled kernel) and the
decoder gets a ``BlockMask`` built from the document and segment ids: causal, within one pair of
the row, a completion token sees its own segment and the prompt, padding sees nothing. The dense
mask lets a padding row see itself instead; padding positions never reach the log-probs, so both
give the same completion log-probs.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from core.packing import PAD, PROMPT, PackedBatch

log = logging.getLogger(__name__)

FLEX = "flex_attention"
FLEX_BUCKET = 128
"""Packed rows are padded to a multiple of this many tokens on the FlexAttention path (its block size)."""


def resolve_attn_implementation(requested: str, device: torch.device | str) -> str:
    """The implementation to load: ``auto`` is flex_attention on CUDA (when torch has it), sdpa elsewhere.

    An explicit ``flex_attention`` off CUDA is sdpa too: torch's CPU FlexAttention cannot train.
    """
    on_cuda = torch.device(device).type == "cuda"
    if requested == FLEX and not on_cuda:
        log.warning("flex_attention has no backward on %s; using sdpa there", torch.device(device).type)
        return "sdpa"
    if requested != "auto":
        return requested
    return FLEX if on_cuda and flex_available() else "sdpa"


def flex_trainable(config: Any) -> bool:
    """False for models with attention dropout: transformers' flex_attention refuses dropout in training."""
    names = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")
    return all(not getattr(config, name, 0.0) for name in names)


def flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def uses_flex(model: nn.Module) -> bool:
    """Whether a (Hugging Face) model was loaded with ``attn_implementation="flex_attention"``."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == FLEX


def bucket_length(length: int, multiple: int = FLEX_BUCKET) -> int:
    """``length`` rounded up to a multiple of ``multiple`` (at least one multiple)."""
    return max(multiple, -(-length // multiple) * multiple)


def pad_batch(batch: PackedBatch, width: int, pad_id: int = 0) -> PackedBatch:
    """The same batch with rows widened to ``width`` tokens of padding (flat source indices re-based)."""
    b, t = batch.input_ids.shape
    if width == t:
        return batch
    if width < t:
        raise ValueError(f"cannot pad a batch of width {t} to {width}")
    extra = width - t

    def widen(x: Tensor, value: int, positions: bool = False) -> Tensor:
        tail = torch.full((b, extra), value, dtype=x.dtype, device=x.device)
        if positions:
            tail = tail + torch.arange(extra, device=x.device)
        return torch.cat([x, tail], dim=1)

    source = batch.source_index
    return replace(
        batch,
        input_ids=widen(batch.input_ids, pad_id),
        position_ids=widen(batch.position_ids, 0, positions=True),
        segments=widen(batch.segments, PAD),
        documents=widen(batch.documents, -1),
        source_index=(source // t) * width + source % t,
    )


def segment_block_mask(
    segments: Tensor, documents: Tensor | None = None, *, block_size: int = FLEX_BUCKET
) -> Any:
    """A FlexAttention ``BlockMask`` ``[R, 1, T, T]`` from packed segment and document ids (see module docstring).

    ``documents`` None means one pair per row.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    b, t = segments.shape
    docs = torch.zeros_like(segments) if documents is None else documents

    def mask_mod(batch: Tensor, head: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        seg_q, seg_k = segments[batch, q], segments[batch, kv]
        same_or_prompt = (seg_q == seg_k) | (seg_k == PROMPT)
        same_pair = docs[batch, q] == docs[batch, kv]
        return (q >= kv) & same_pair & same_or_prompt & (seg_k != PAD) & (seg_q != PAD)

    return create_block_mask(mask_mod, b, None, t, t, device=segments.device, BLOCK_SIZE=block_size)


def prepare_attention(batch: PackedBatch, model: nn.Module, dtype: torch.dtype) -> tuple[PackedBatch, Any]:
    """The batch (bucketed for flex) and the attention mask the model's attention implementation takes."""
    if not uses_flex(model):
        return batch, batch.attention_mask(dtype)
    batch = pad_batch(batch, bucket_length(batch.input_ids.shape[1]))
    return batch, segment_block_mask(batch.segments, batch.documents)


@contextmanager
def eager_flex_attention() -> Iterator[None]:
    """Run transformers' flex_attention path uncompiled (CPU tests and dry runs: no compile wait).

    torch's CPU FlexAttention has no backward, so where gradients are needed on CPU this runs
    FlexAttention's own eager reference (``math_attention``, the same mask_mod and score_mod over a
    dense score matrix) under autograd instead. Not for production: CUDA runs the compiled kernel.
    """
    from torch.nn.attention.flex_attention import flex_attention
    from transformers.integrations import flex_attention as hf_flex

    def eager(query: Tensor, key: Tensor, value: Tensor, training: bool = False, **kwargs: Any) -> Any:
        needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value))
        if query.device.type == "cpu" and needs_grad:
            return _math_flex_attention(query, key, value, **kwargs)
        return flex_attention(query, key, value, **kwargs)

    original = hf_flex.compile_friendly_flex_attention
    hf_flex.compile_friendly_flex_attention = eager
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            yield
    finally:
        hf_flex.compile_friendly_flex_attention = original


def _math_flex_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    score_mod: Any = None,
    block_mask: Any = None,
    scale: float | None = None,
    return_aux: Any = None,
    return_lse: bool = False,
    **_: Any,
) -> Tensor:
    from torch._higher_order_ops.flex_attention import math_attention

    if return_aux is not None or return_lse:
        raise NotImplementedError("the CPU autograd fallback does not return the log-sum-exp")
    if score_mod is None:
        score_mod = _identity_score
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    out, _lse, _max = math_attention(query, key, value, score_mod, block_mask.as_tuple(), scale, {})
    return out


def _identity_score(score: Tensor, batch: Tensor, head: Tensor, q: Tensor, kv: Tensor) -> Tensor:
    return score


__all__ = [
    "FLEX",
    "FLEX_BUCKET",
    "bucket_length",
    "eager_flex_attention",
    "flex_available",
    "flex_trainable",
    "pad_batch",
    "prepare_attention",
    "resolve_attn_implementation",
    "segment_block_mask",
    "uses_flex",
]

"""Eval generations: greedy completions of the first N eval prompts (the same prompts at every eval).

Every rank runs the same decode: under FSDP2 the root unit's parameters are gathered around it and
Hugging Face's ``synced_gpus`` keeps the ranks' forward passes in step until every rank is done, so
no rank waits on a collective the others never join. The caller reports rank 0's samples.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from core.attention import uses_flex
from core.data import EncodedPair
from core.models import causal_lm
from core.precision import autocast
from core.sharding import is_sharded, reshard_after_no_grad
from core.spec import MAX_GENERATION_TEXT_CHARS, TrainingSpec


def greedy_decode(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pad_id: int,
    eos_id: int | None,
    device: torch.device,
    synced: bool = False,
) -> list[list[int]]:
    """Greedy completion ids of each prompt (left-padded into one batch), cut before the first EOS."""
    from transformers import GenerationConfig

    lm = causal_lm(model)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        use_cache=True,
    )
    out = lm.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        generation_config=config,
        synced_gpus=synced,
    )
    completions = []
    for row in out[:, width:].tolist():
        end = row.index(eos_id) if eos_id is not None and eos_id in row else len(row)
        completions.append(row[:end])
    return completions


@contextmanager
def _generation_mode(scorer: nn.Module) -> Iterator[None]:
    """Eval mode, no grad, SDPA instead of FlexAttention, the root's weights gathered under FSDP2; all undone after."""
    lm = causal_lm(scorer.model)  # type: ignore[arg-type]
    flex = uses_flex(lm)
    was_training = scorer.training
    scorer.eval()
    if flex:
        lm.set_attn_implementation("sdpa")
    if is_sharded(scorer):
        scorer.unshard()  # type: ignore[operator]
    try:
        with torch.no_grad():
            yield
    finally:
        reshard_after_no_grad(scorer)
        if flex:
            lm.set_attn_implementation("flex_attention")
        scorer.train(was_training)


def _text(tokenizer: Any, ids: Sequence[int]) -> str:
    return str(tokenizer.decode(list(ids), skip_special_tokens=True))[:MAX_GENERATION_TEXT_CHARS]


def eval_generations(
    scorer: nn.Module,
    tokenizer: Any,
    pairs: Sequence[EncodedPair],
    training: TrainingSpec,
    device: torch.device,
) -> list[dict[str, Any]]:
    """``{index, prompt, chosen, completion}`` for the first ``training.eval_generations`` pairs, decoded greedily."""
    picked, batch_size = list(pairs[: training.eval_generations]), training.batch_size
    pad_id, eos_id = int(tokenizer.pad_token_id), tokenizer.eos_token_id
    completions: list[list[int]] = []
    with _generation_mode(scorer), autocast(getattr(scorer, "compute_dtype", torch.float32), device):
        # training.batch_size prompts at a time: what fits a training step fits their KV cache (under
        # FSDP each decoded token gathers every layer, so fewer, larger batches would decode faster)
        for start in range(0, len(picked), batch_size):
            completions += greedy_decode(
                scorer.model,  # type: ignore[arg-type]
                [p.prompt_ids for p in picked[start : start + batch_size]],
                max_new_tokens=training.eval_generation_tokens,
                pad_id=pad_id,
                eos_id=eos_id,
                device=device,
                synced=is_sharded(scorer),
            )
    return [
        {
            "index": i,
            "prompt": _text(tokenizer, pair.prompt_ids),
            "chosen": _text(tokenizer, pair.chosen_ids),
            "completion": _text(tokenizer, completion),
        }
        for i, (pair, completion) in enumerate(zip(picked, completions, strict=True))
    ]

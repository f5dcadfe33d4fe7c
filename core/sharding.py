"""FSDP2 (`fully_shard`) for the scorer: one unit per decoder layer, the scorer as root, full-weight I/O.

Only rank 0 reads the pretrained weights; the other ranks build the same architecture on the meta
device (no memory, no file read), every rank shards, and rank 0's full weights and buffers are
broadcast into the shards (`set_model_state_dict(..., broadcast_from_rank0=True)`).

The input embeddings and LM head (tied or not) are sharded by vocabulary rows (core.vocab_sharding):
never gathered, FSDP ignores them. Where a model's are not plain ``nn.Embedding``/bias-free
``nn.Linear``, or on more than core.vocab_sharding.MAX_RANKS ranks, they are FSDP units instead:
untied input embeddings get a unit of their own, gathered for the forward's first op only (their gradient needs no weights), and so does an untied LM head, whose
one FSDP forward is the whole chunked log-prob pass (core.scoring calls the head once per chunk); a
tied pair stays in the root unit, gathered from the forward until the end of the backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn

from core.models import ModelLoadError, causal_lm, lora_config, model_skeleton
from core.rank_zero import share_from_rank0
from core.scoring import HEAD_UNIT_METHOD, PairScorer, PairScores
from core.vocab_sharding import VocabShardedEmbedding, VocabShardedHead, shard_vocabulary, vocab_shardable

_PYTREE_REGISTERED = False


def _register_outputs() -> None:
    """Let FSDP see the tensors inside PairScores (it hooks the root's outputs for backward)."""
    global _PYTREE_REGISTERED
    if not _PYTREE_REGISTERED:
        torch.export.register_dataclass(PairScores)
        _PYTREE_REGISTERED = True


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a Hugging Face causal LM: its ``_no_split_modules`` classes, else ``model.layers``."""
    lm = causal_lm(model)
    names = set(getattr(lm, "_no_split_modules", None) or [])
    layers = [m for m in lm.modules() if type(m).__name__ in names]
    if layers:
        return layers
    inner = getattr(lm, "model", None)
    found = getattr(inner, "layers", None)
    if found is None:
        raise ValueError(f"cannot find the decoder layers of {type(lm).__name__} to shard")
    return list(found)


def mixed_precision(dtype: torch.dtype) -> Any:
    """bf16 parameters in forward/backward with fp32 gradient reduction, or full fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if dtype == torch.bfloat16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_scorer(scorer: nn.Module, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """Shard ``scorer`` in place: the embeddings and head by vocabulary rows where they can be (else FSDP
    units of their own when untied), ``fully_shard`` on each decoder layer and on ``scorer`` (the root);
    a PairScorer's log-prob pass is routed through a sharded head and its masks take the layers' dtype."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not torch_dist.is_initialized():
        raise RuntimeError("resources.strategy fsdp needs an initialised torch.distributed process group")
    _register_outputs()
    mesh = init_device_mesh(torch.device(device).type, (torch_dist.get_world_size(),))
    policy = mixed_precision(dtype)
    model = getattr(scorer, "model", scorer)
    lm = causal_lm(model)
    ignored: set[nn.Parameter] = set()
    if vocab_shardable(lm, torch_dist.get_world_size()):
        ignored = shard_vocabulary(lm, mesh, policy.param_dtype)
        if isinstance(scorer, PairScorer) and isinstance(lm.get_output_embeddings(), VocabShardedHead):
            _route_head(scorer, lm.get_output_embeddings())
    embeddings, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    units = shard_units(model)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
        if unit is embeddings:  # a lookup's gradient needs no weights: not gathered again for backward
            unit.set_unshard_in_backward(False)  # type: ignore[operator]
    untied = embeddings in units
    if untied and type(head) is nn.Linear and isinstance(scorer, PairScorer):
        _shard_head(scorer, head, mesh, policy)
    fully_shard(scorer, mesh=mesh, mp_policy=policy, ignored_params=ignored or None)
    if isinstance(scorer, PairScorer):  # the attention mask in the dtype the layers compute in
        scorer.param_dtype = policy.param_dtype
    return scorer


def _route_head(scorer: PairScorer, head: VocabShardedHead) -> None:
    """The scorer's log-prob pass goes through the vocabulary-sharded head's own chunked ``logps``."""

    def completion_logps(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return head.logps(hidden, targets, chunk_size=scorer.chunk_size, softcap=scorer.softcap)

    setattr(head, HEAD_UNIT_METHOD, completion_logps)


def _shard_head(scorer: PairScorer, head: nn.Linear, mesh: Any, policy: Any) -> None:
    """An untied LM head as a unit of its own whose one forward is the scorer's whole chunked log-prob
    pass (``HEAD_UNIT_METHOD``): gathered once per pass, its gradient reduce-scattered and its weights
    freed as soon as that pass's backward ends, not held through the decoder's backward in the root."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    fully_shard(head, mesh=mesh, mp_policy=policy, reshard_after_forward=False)

    def completion_logps(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the gathered weights, read at each call (and at each chunk's recompute): not the module's
        # own forward, whose FSDP hooks would run once per chunk
        return scorer.head_logps(lambda states: F.linear(states, head.weight, head.bias), hidden, targets)

    setattr(head, HEAD_UNIT_METHOD, completion_logps)
    register_fsdp_forward_method(head, HEAD_UNIT_METHOD)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules that get an FSDP unit below the root: untied input embeddings that are not sharded by
    vocabulary rows, then each decoder layer."""
    lm = causal_lm(model)
    embeddings, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    tied = head is not None and head.weight is embeddings.weight
    own_unit = not tied and not isinstance(embeddings, VocabShardedEmbedding)
    return ([embeddings] if own_unit else []) + decoder_layers(model)


def load_sharded_scorer(
    load_full: Callable[[], nn.Module],
    make_scorer: Callable[[nn.Module], nn.Module],
    device: torch.device | str,
    dtype: torch.dtype,
) -> nn.Module:
    """A sharded scorer holding rank 0's pretrained weights, read by rank 0 alone.

    Rank 0 calls ``load_full`` (``from_pretrained``, with LoRA adapters or not); the other ranks build
    the model from rank 0's config (and adapter config) on the meta device. ``make_scorer`` wraps the
    model (the same on every rank); every rank shards it, the non-zero ranks allocate their
    (uninitialised) shards, and rank 0 broadcasts its weights, its adapters' initial weights included,
    and buffers (e.g. rotary ``inv_freq``, which no state dict holds) into them.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    rank = torch_dist.get_rank()
    model, failure = None, None
    if rank == 0:
        try:
            model = load_full()
        except Exception as exc:
            failure = exc
    found = (None, None, None, str(failure))
    if model is not None:
        found = (causal_lm(model).config, causal_lm(model).dtype, lora_config(model), None)
    shared = share_from_rank0(found, torch_dist.get_world_size())
    if failure is not None:
        raise failure  # after the broadcast: the other ranks are told, none waits for rank 0
    config, model_dtype, adapters, error = shared
    if error is not None:
        raise ModelLoadError(f"rank 0 could not load the model: {error}")
    if model is None:
        model = model_skeleton(config, model_dtype, adapters)
    scorer = make_scorer(model)
    full = scorer.state_dict() if rank == 0 else {}
    shard_scorer(scorer, device, dtype)
    if rank != 0:
        scorer.to_empty(device=device)
        causal_lm(model).tie_weights()  # a tied head shares the embeddings' new shard again (no-op if untied)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(scorer, full, options=options)
    del full
    for buffer in scorer.buffers():
        torch_dist.broadcast(buffer, src=0)
    return scorer


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def reshard_after_no_grad(module: nn.Module) -> None:
    """Register a sharded module's sharded parameters again after no-grad forwards; a no-op unsharded.

    FSDP2 leaves the root unit's parameters gathered after a forward until a backward reshards them;
    after a pass without backward (reference, eval) the module would otherwise hold the full root
    parameters, which an optimizer built or a state dict taken then would see instead of the shards.
    """
    head = causal_lm(getattr(module, "model", module)).get_output_embeddings()
    for unit in (module, head):  # the units that keep their weights after a forward: root, an untied head
        if unit is not None and is_sharded(unit):
            unit.reshard()  # type: ignore[operator]


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (e.g. the gradient norm ``clip_grad_norm_`` returns under FSDP2); else itself."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def _tied_aliases(model: nn.Module) -> set[str]:
    """Names of parameters that are another name's parameter (a tied LM head), first name kept."""
    seen: set[int] = set()
    aliases = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.add(id(param))
    return aliases


def full_model_state_dict(scorer: nn.Module) -> dict[str, torch.Tensor]:
    """The scorer's model's full weights on CPU, keyed as the model's own state dict, tied aliases left
    out (as ``save_pretrained`` writes them); on rank 0, empty elsewhere. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(scorer, options=options)
    aliases = _tied_aliases(scorer.model)
    full = {k.removeprefix("model."): v for k, v in state.items()}
    return {k: v for k, v in full.items() if k not in aliases}


def unsharded_copy(scorer: nn.Module) -> nn.Module | None:
    """On rank 0, the sharded scorer's model rebuilt on CPU with its full weights (a LoRA model keeps its
    adapters, to be saved or merged as without FSDP); None elsewhere. Every rank must call it.

    The copy is a meta skeleton that takes the gathered tensors themselves (``assign``), so rank 0 holds
    the full weights once; the buffers, which FSDP does not shard, come from rank 0's sharded model.
    """
    full = full_model_state_dict(scorer)
    if torch_dist.get_rank() != 0:
        return None
    model = scorer.model
    lm = causal_lm(model)
    copy = model_skeleton(lm.config, lm.dtype, lora_config(model))
    missing, unexpected = copy.load_state_dict(full, strict=False, assign=True)
    causal_lm(copy).tie_weights()
    if unexpected or set(missing) - _tied_aliases(copy):
        raise RuntimeError(
            f"gathered weights do not fit the model: missing {missing}, unexpected {unexpected}"
        )
    for name, buffer in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        copy.get_submodule(owner)._buffers[leaf] = buffer.detach().cpu().clone()
    return copy

"""FSDP2 (`fully_shard`) for the scorer: one unit per decoder layer, the scorer as root, full-weight I/O.

Every rank loads the weights and then shards them (`fully_shard` keeps only this rank's slice of each
parameter, so the full copy is freed as soon as sharding is done). The embeddings and the LM head
stay in the root unit: the head is called once per log-prob chunk (core.scoring), and a tied head
shares its weight with the embeddings, so a unit of its own would gather it once per chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from core.models import causal_lm
from core.scoring import PairScores

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
    """Apply ``fully_shard`` to each decoder layer and then to ``scorer`` (the root), in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not torch_dist.is_initialized():
        raise RuntimeError("resources.strategy fsdp needs an initialised torch.distributed process group")
    _register_outputs()
    mesh = init_device_mesh(torch.device(device).type, (torch_dist.get_world_size(),))
    policy = mixed_precision(dtype)
    for layer in decoder_layers(getattr(scorer, "model", scorer)):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(scorer, mesh=mesh, mp_policy=policy)
    return scorer


def fsdp_wrapper(device: torch.device | str, dtype: torch.dtype) -> Callable[[nn.Module], nn.Module]:
    """A ``Distributed.wrap_model`` that shards the scorer with FSDP2."""
    return lambda scorer: shard_scorer(scorer, device, dtype)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


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

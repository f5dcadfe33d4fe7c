"""Training checkpoints: an HF-format model folder plus everything an exact resume needs."""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.models import is_peft

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class LoopState:
    """Where the loop is: optimizer steps done, next batch in the stream, counters."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    num_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: Path,
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loop: LoopState,
    *,
    keep: int,
) -> Path:
    """Write ``root/step-N`` atomically (model/ in HF safetensors or LoRA adapter form + trainer_state.pt)."""
    final = root / f"step-{loop.step:07d}"
    tmp = root / f".tmp-step-{loop.step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    policy.save_pretrained(tmp / "model", safe_serialization=True)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "loop": asdict(loop),
            "rng": rng_state(),
            "lora": is_peft(policy),
        },
        tmp / STATE_FILE,
    )
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


SHARDED_DIR = "sharded"


def save_sharded_checkpoint(
    root: Path,
    scorer: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loop: LoopState,
    *,
    rank: int,
    keep: int,
) -> Path | None:
    """FSDP: every rank writes its shards of model + optimizer (torch.distributed.checkpoint) to
    ``root/step-N/sharded``; rank 0 adds trainer_state.pt and publishes the folder. Every rank calls it;
    rank 0 gets the path, the others None. ``root`` must be one folder that every rank sees. Under LoRA
    the model part is the adapters only: the frozen base is the pretrained model, loaded again on resume."""
    import torch.distributed as torch_dist
    import torch.distributed.checkpoint as dcp

    final = root / f"step-{loop.step:07d}"
    tmp = root / f".tmp-step-{loop.step:07d}-sharded"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    torch_dist.barrier()
    model_state, optim_state, _ = _sharded_state(scorer, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp / SHARDED_DIR)
    if rank != 0:  # dcp.save returns on rank 0 only after every rank has written its files
        torch_dist.barrier()
        return None
    state = {
        "scheduler": scheduler.state_dict(),
        "loop": asdict(loop),
        "rng": rng_state(),
        "sharded": True,
        "lora": is_peft(scorer.model),
    }
    torch.save(state, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    torch_dist.barrier()
    return final


def load_sharded_state(checkpoint: Path, scorer: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint's model and optimizer state into an already-sharded scorer (every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model_state, optim_state, options = _sharded_state(scorer, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=checkpoint / SHARDED_DIR)
    keys = set_state_dict(
        scorer, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options
    )
    frozen = {name for name, p in scorer.named_parameters(remove_duplicate=False) if not p.requires_grad}
    if keys.unexpected_keys or set(keys.missing_keys) - frozen:
        raise RuntimeError(f"sharded checkpoint {checkpoint} does not fit the model: {keys}")


def _sharded_state(scorer: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict, Any]:
    """The model and optimizer state a sharded checkpoint holds, and the options to load it with: under
    LoRA the trainable adapters only (the frozen base is not checkpointed, so not loaded either)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    lora = is_peft(scorer.model)
    options = StateDictOptions(ignore_frozen_params=lora, strict=not lora)
    model_state, optim_state = get_state_dict(scorer, optimizer, options=options)
    if lora:  # the option keeps a tied head, a second name of the frozen embeddings
        trainable = {n for n, p in scorer.named_parameters(remove_duplicate=False) if p.requires_grad}
        model_state = {k: v for k, v in model_state.items() if k in trainable}
    return model_state, optim_state, options


def is_sharded_checkpoint(checkpoint: Path) -> bool:
    return (checkpoint / SHARDED_DIR).is_dir()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The optimizer/scheduler/loop/RNG state saved beside a checkpoint's model."""
    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)
    state["loop"] = LoopState(**state["loop"])
    return state

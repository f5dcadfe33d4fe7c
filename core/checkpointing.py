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
from core.run_context import TrainingError

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class LoopState:
    """Where the loop is: optimizer steps done, next batch in the stream, counters.

    ``batch_in_epoch`` counts this rank's batches of ``batch_size`` pairs, one per rank and global step
    of ``world_size * batch_size`` pairs (core.data.LengthGroupedBatches); None in older checkpoints.
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    num_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    world_size: int | None = None
    batch_size: int | None = None


def check_resume_position(loop: LoopState, world_size: int, batch_size: int) -> None:
    """A checkpoint resumes on another number of ranks only with the same pairs per global step.

    The batch plan cuts each epoch into the same global steps whenever ``world_size * batch_size``
    is the same, so (epoch, batch in epoch) is then the same place in the data (only an epoch's last,
    short step differs: more ranks split it evenly and leave out at most world_size - 1 pairs); with
    another global batch the steps are other sets of pairs, and no position resumes the run exactly.
    """
    if loop.world_size is None or loop.batch_size is None:
        return
    if loop.world_size * loop.batch_size != world_size * batch_size:
        raise TrainingError(
            "resume_batch_mismatch",
            f"the checkpoint at step {loop.step} was written with resources.num_workers {loop.world_size} "
            f"and training.batch_size {loop.batch_size} ({loop.world_size * loop.batch_size} pairs per step); "
            f"this run has num_workers {world_size} and batch_size {batch_size} ({world_size * batch_size}): "
            "a resume needs the same pairs per step",
        )


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
    return publish_checkpoint(tmp, final, root, keep=keep)


def publish_checkpoint(tmp: Path, final: Path, root: Path, *, keep: int) -> Path:
    """Make a complete ``tmp`` folder the checkpoint ``final`` (one rename); keep the newest ``keep``."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


SHARDED_DIR = "sharded"
"""The folder of a checkpoint that holds the FSDP shards (core.sharded_checkpoint)."""


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
    """The optimizer/scheduler/loop/RNG state saved beside a checkpoint's model.

    The file is memory-mapped (copy-on-write): its tensors (a DDP checkpoint's full optimizer state) are
    read from the page cache, which the ranks of a node share, as they are used, not copied on load.
    """
    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False, mmap=True)
    state["loop"] = LoopState(**state["loop"])
    return state

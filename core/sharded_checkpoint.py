"""FSDP checkpoints with torch.distributed.checkpoint: shards written in the background, loaded resharded.

`ShardedSaver.start` copies every rank's shards of model and optimizer state to CPU memory and hands
them to ``dcp.async_save``, whose thread writes them (its collectives on a gloo group of their own, so
they never interleave with the training step's); rank 0 publishes the folder (trainer state, then one
rename) once the write has completed on every rank. A second save first waits for the one before.
`load_sharded_state` reads such a checkpoint on any world size, and into an unsharded model too (DCP
reshards); `load_full_optimizer_state` gives a sharded optimizer the state of a full (DDP) checkpoint.
"""

from __future__ import annotations

import copy
import shutil
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.checkpointing import SHARDED_DIR, STATE_FILE, LoopState, publish_checkpoint, rng_state
from core.models import is_peft
from core.reporting import Reporter
from core.run_context import Distributed


@dataclass
class PendingSave:
    """A checkpoint being written: its write, where it goes, and what rank 0 adds when it is durable."""

    future: Future
    tmp: Path
    final: Path
    state: dict[str, Any]
    step: int
    metrics: dict[str, float]


class ShardedSaver:
    """The FSDP checkpoints of one run, written by every rank in the background (one at a time); each is
    reported (``Reporter.checkpoint``, the folder on rank 0, None elsewhere) once it is durable, at the
    same step on every rank (Ray's ``report`` is a barrier), so the ranks agree when it is done."""

    def __init__(self, root: Path, reporter: Reporter, dist: Distributed, *, keep: int) -> None:
        self.root, self.reporter, self.keep = root, reporter, keep
        self.rank, self.world_size, self.all_reduce_sum = dist.rank, dist.world_size, dist.all_reduce_sum
        self.pending: PendingSave | None = None
        self._group: Any = None

    def start(
        self,
        scorer: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        loop: LoopState,
        metrics: dict[str, float],
    ) -> None:
        """Begin writing ``root/step-N`` (every rank calls it), once the save before it is durable."""
        import torch.distributed as torch_dist
        import torch.distributed.checkpoint as dcp

        self.wait()
        if self._group is None:  # collective: every rank creates it at the same (first) save
            self._group = torch_dist.new_group(backend="gloo")
        tmp = self.root / f".tmp-step-{loop.step:07d}-sharded"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        torch_dist.barrier()
        model_state, optim_state, _ = _sharded_state(scorer, optimizer)
        state = {  # taken now: the loop goes on while the shards are written
            "scheduler": copy.deepcopy(scheduler.state_dict()),
            "loop": asdict(loop),
            "rng": rng_state(),
            "sharded": True,
            "lora": is_peft(scorer.model),
        }
        # the default stager copies the tensors to CPU before async_save returns: the next step may
        # change the parameters and optimizer state at once
        future = dcp.async_save(
            {"model": model_state, "optim": optim_state},
            checkpoint_id=tmp / SHARDED_DIR,
            process_group=self._group,
        )
        final = self.root / f"step-{loop.step:07d}"
        self.pending = PendingSave(future, tmp, final, state, loop.step, dict(metrics))  # type: ignore[arg-type]

    def poll(self) -> None:
        """Publish the pending checkpoint once its write has finished on every rank; never waits for the
        write (every rank calls it after each step: one small all-reduce while a write is pending)."""
        if self.pending is None:
            return
        done = torch.tensor([float(self.pending.future.done())], dtype=torch.float64)
        if self.all_reduce_sum is not None:
            done = self.all_reduce_sum(done)
        if done.item() == self.world_size:
            self.wait()

    def wait(self) -> None:
        """Wait for the pending write (if any) and publish it: rank 0 adds the trainer state and renames."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        pending.future.result()  # on every rank it returns once all ranks' files and the metadata are written
        path = None
        if self.rank == 0:
            torch.save(pending.state, pending.tmp / STATE_FILE)
            path = publish_checkpoint(pending.tmp, pending.final, self.root, keep=self.keep)
        self.reporter.checkpoint(pending.step, path, pending.metrics)

    def close(self) -> None:
        """Wait for the pending write, then free the checkpoint group (every rank)."""
        import torch.distributed as torch_dist

        self.wait()
        if self._group is not None:
            torch_dist.destroy_process_group(self._group)
            self._group = None


def load_sharded_state(checkpoint: Path, scorer: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint's model and optimizer state (every rank), whatever world size wrote it:
    into a sharded scorer, or into an unsharded one (DDP, one process) as full tensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model_state, optim_state, options = _sharded_state(scorer, optimizer)
    state = {"model": model_state, "optim": optim_state}
    one_process = not torch.distributed.is_initialized()  # every rank's shards, read into full tensors
    dcp.load(state, checkpoint_id=checkpoint / SHARDED_DIR, no_dist=one_process)
    keys = set_state_dict(
        scorer, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options
    )
    frozen = {name for name, p in scorer.named_parameters(remove_duplicate=False) if not p.requires_grad}
    if keys.unexpected_keys or set(keys.missing_keys) - frozen:
        raise RuntimeError(f"sharded checkpoint {checkpoint} does not fit the model: {keys}")


def load_full_optimizer_state(scorer: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load a full checkpoint's ``optimizer.state_dict()`` (DDP: keyed by parameter position) into an
    optimizer over sharded parameters: keyed by parameter name instead, each rank keeps its slices."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): name for name, p in scorer.named_parameters()}
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise RuntimeError("the checkpoint's optimizer has other parameter groups than this run's")
    by_position: dict[int, str] = {}
    groups = []
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"], strict=True):
        if len(group["params"]) != len(saved_group["params"]):
            raise RuntimeError("the checkpoint's optimizer has other parameters than this run's")
        fqns = [names[id(p)] for p in group["params"]]
        by_position.update(zip(saved_group["params"], fqns, strict=True))
        groups.append({**saved_group, "params": fqns})
    state = {by_position[i]: value for i, value in saved["state"].items()}
    options = StateDictOptions(full_state_dict=True)  # every rank holds the full state: it takes its slices
    set_optimizer_state_dict(
        scorer, optimizer, optim_state_dict={"state": state, "param_groups": groups}, options=options
    )


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

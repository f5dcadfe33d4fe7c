"""ShardedSaver on 2 gloo ranks (spawned in-process): the write runs in the background while training
collectives go on, the folder appears and is reported only once durable, and it holds the state of the
moment the save started."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from core.checkpointing import STATE_FILE, LoopState, list_checkpoints, load_trainer_state
from core.reporting import NullReporter
from core.run_context import Distributed
from core.sharded_checkpoint import ShardedSaver, load_sharded_state
from tests.core.gloo_ranks import all_reduce_sum, spawn_gloo


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class Saved(NullReporter):
    def __init__(self) -> None:
        self.saved: list[tuple[int, str | None]] = []

    def checkpoint(self, step: int, path: Path | None, values: dict[str, float]) -> None:
        self.saved.append((step, str(path) if path else None))


def sharded_toy() -> tuple[Toy, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    toy = Toy()
    fully_shard(toy.model[0])
    fully_shard(toy)
    return toy, torch.optim.AdamW(toy.parameters(), lr=0.1)


def train_step(toy: Toy, optimizer: torch.optim.Optimizer) -> None:
    toy(torch.randn(4, 8)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def full(toy: Toy, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every parameter and its AdamW moments, gathered (a collective on the default group)."""
    values = {}
    for name, p in toy.named_parameters():
        values[name] = p.full_tensor().clone()
        values[name + ".exp_avg"] = optimizer.state[p]["exp_avg"].full_tensor().clone()
    return values


def _rank(rank: int, root: str) -> None:
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    release, write = threading.Event(), FileSystemWriter.write_data

    def held_write(self: Any, *args: Any, **kwargs: Any) -> Any:
        assert release.wait(60), "the test never released the write"
        return write(self, *args, **kwargs)

    FileSystemWriter.write_data = held_write  # type: ignore[method-assign]
    toy, optimizer = sharded_toy()
    train_step(toy, optimizer)
    at_save = full(toy, optimizer)
    reporter = Saved()
    saver = ShardedSaver(Path(root), reporter, Distributed(rank, 2, all_reduce_sum), keep=2)
    saver.start(
        toy,
        optimizer,
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
        LoopState(step=1),
        {"loss": 1.0},
    )
    for _ in range(3):  # the write is held: training (default-group collectives) goes on meanwhile
        train_step(toy, optimizer)
        saver.poll()
    after = full(toy, optimizer)
    early = {"published": bool(list_checkpoints(Path(root))), "reported": list(reporter.saved)}
    release.set()
    polls = 0
    while saver.pending is not None:  # poll publishes once the write is done on every rank, no wait
        saver.poll()
        polls += 1
    torch_dist.barrier()
    fresh, fresh_optimizer = sharded_toy()
    train_step(fresh, fresh_optimizer)  # other values, and optimizer state to load into
    load_sharded_state(Path(root) / "step-0000001", fresh, fresh_optimizer)
    loaded = full(fresh, fresh_optimizer)
    saver.close()
    result = {
        "early": early,
        "reported": reporter.saved,
        "polls": polls,
        "loaded_equals_save_time": all(torch.equal(loaded[k], at_save[k]) for k in at_save),
        "moved_after_save": any(not torch.equal(after[k], at_save[k]) for k in at_save),
    }
    (Path(root) / f"rank{rank}.json").write_text(json.dumps(result))


def test_background_save_is_published_when_durable_with_the_state_it_started_from(tmp_path: Path) -> None:
    spawn_gloo(_rank, str(tmp_path))
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert zero["polls"] == one["polls"]  # both ranks report at the same point (Ray's report is a barrier)
    for rank in (zero, one):
        assert rank["early"] == {"published": False, "reported": []}  # 3 steps ran while the write was held
        assert rank["moved_after_save"] and rank["loaded_equals_save_time"]
    final = tmp_path / "step-0000001"
    assert zero["reported"] == [[1, str(final)]] and one["reported"] == [[1, None]]
    assert (final / STATE_FILE).exists() and len(list((final / "sharded").glob("*.distcp"))) == 2
    assert load_trainer_state(final)["loop"].step == 1
    assert not list(tmp_path.glob(".tmp-*"))  # the folder was renamed, not copied

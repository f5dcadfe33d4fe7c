"""Run a function on N gloo ranks spawned in-process (no Ray), and the loop's all-reduce for them."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from workers.ports import listen_ports


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (in float64, as the train worker's), in ``tensor``'s dtype."""
    buf = tensor.detach().to(torch.float64).clone()
    torch_dist.all_reduce(buf)
    return buf.to(tensor.dtype)


def _rank_entry(rank: int, port: int, world_size: int, fn: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(1)
    init = f"tcp://127.0.0.1:{port}"
    torch_dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    try:
        fn(rank, *args)
        torch_dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        torch_dist.destroy_process_group()
    # Leave without finalising the interpreter: a gloo worker thread may still be releasing its last
    # collective's work object, whose thread-local state holds a Python object, and taking the GIL
    # during finalisation ends the process in std::terminate (SIGABRT) now and then (torch 2.13).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_gloo(fn: Callable[..., Any], *args: Any, ranks: int = 2) -> None:
    """``fn(rank, *args)`` on ``ranks`` processes joined in one gloo group; raises if any rank fails.

    ``fn`` must be a module-level function (it is pickled); results come back through files.
    """
    port = listen_ports(1)[0]  # outside the ephemeral range: no outgoing connection takes it meanwhile
    mp.spawn(_rank_entry, (port, ranks, fn, args), nprocs=ranks, join=True)

"""Where a step's reference log-probs come from: a cached precomputed table, a live model, or nothing.

Precomputed (the default): one no-grad pass before training. Before any update the policy *is* the
reference (with LoRA: the base model, adapters disabled), so no second model is loaded; only a run
that resumes without a cached table loads the reference weights, and frees them after the pass.
Live: a frozen copy (or, with LoRA, the policy with adapters disabled) scores every batch.
Under FSDP the pass runs on the sharded policy and a frozen copy is sharded too (rank 0 reads it).
Rank 0 alone fingerprints the model, computes the cache key and decides hit or miss; a hit's table
is broadcast, so no rank reads a cache file another rank may not see.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from core.data import PreparedData
from core.models import adapters_disabled, is_peft, load_model, model_fingerprint
from core.packing import PackedBatch
from core.precision import compute_dtype
from core.rank_zero import share_from_rank0
from core.reference import ReferenceCache, ReferenceTable, cache_key, compute_reference
from core.reporting import Reporter
from core.scoring import PairScorer, scorer_for
from core.sharding import is_sharded, reshard_after_no_grad
from core.spec import JobSpec


@dataclass
class ReferenceSource:
    """Reference log-probs for a packed batch; ``offset`` maps eval indices into the table (train first)."""

    device: torch.device
    table: ReferenceTable | None = None
    live: PairScorer | None = None
    live_context: Callable[[], AbstractContextManager[Any]] = nullcontext

    def logps(self, batch: PackedBatch, offset: int = 0) -> tuple[Tensor, Tensor]:
        if self.table is not None:
            rc, rr = self.table.lookup(batch.example_index.cpu() + offset)
            return rc.to(self.device), rr.to(self.device)
        if self.live is not None:
            with torch.no_grad(), self.live_context():
                s = self.live(batch)
            reshard_after_no_grad(self.live)
            return s.chosen_logps.detach(), s.rejected_logps.detach()
        zeros = torch.zeros(batch.num_pairs, device=self.device)  # reference-free losses
        return zeros, zeros


@dataclass
class ReferenceSetup:
    """What building the reference needs to know about the run."""

    spec: JobSpec
    device: torch.device
    pad_id: int
    cache_dir: Path
    allow_remote_code: bool
    rank: int = 0
    world_size: int = 1
    all_reduce_sum: Callable[[Tensor], Tensor] | None = None
    policy_scorer: PairScorer | None = None  # the (sharded) policy's scorer, when not a plain scorer_for
    load_sharded: Callable[[], PairScorer] | None = None  # under FSDP: a frozen, sharded reference copy

    def fresh_scorer(self) -> PairScorer:
        """A frozen scorer over freshly loaded reference weights (sharded under FSDP)."""
        if self.load_sharded is not None:
            return self.load_sharded()
        ref = load_model(self.spec.model, allow_remote_code=self.allow_remote_code, device=self.device)
        return scorer_for(ref.eval().requires_grad_(False), self.spec.training, self.device)


def build_reference(
    setup: ReferenceSetup,
    data: PreparedData,
    policy: nn.Module,
    *,
    needs_reference: bool,
    resumed: bool,
    reporter: Reporter,
) -> ReferenceSource:
    """The run's ReferenceSource (see module docstring)."""
    spec = setup.spec
    if not needs_reference:
        return ReferenceSource(setup.device)
    if not spec.training.precompute_ref_logps:
        if is_peft(policy):
            return ReferenceSource(
                setup.device,
                live=setup.policy_scorer or scorer_for(policy, spec.training, setup.device),
                live_context=lambda: adapters_disabled(policy),
            )
        return ReferenceSource(setup.device, live=setup.fresh_scorer())
    return ReferenceSource(setup.device, table=_precomputed_table(setup, data, policy, resumed, reporter))


def _precomputed_table(
    setup: ReferenceSetup, data: PreparedData, policy: nn.Module, resumed: bool, reporter: Reporter
) -> ReferenceTable:
    spec = setup.spec
    pairs = data.train + data.eval
    key, table = share_from_rank0(_cached(setup, data) if setup.rank == 0 else None, setup.world_size)
    if table is not None:
        reporter.event("reference", "reference log-probs reused from cache", {"key": key, "cached": True})
        return table
    started = time.perf_counter()
    if resumed and not is_peft(policy):  # the policy has moved: load the reference weights for this pass
        scorer, context = setup.fresh_scorer(), nullcontext()
    else:
        scorer = setup.policy_scorer or scorer_for(policy, spec.training, setup.device)
        context = adapters_disabled(policy)
    # longest packed rows first, cut into batches: neighbours have similar widths, so little padding
    width = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -width[i])
    size = spec.training.batch_size
    batches = [order[k : k + size] for k in range(0, len(order), size)]
    mine = [b for k, b in enumerate(batches) if k % setup.world_size == setup.rank]
    rounds = math.ceil(len(batches) / setup.world_size) if is_sharded(scorer) else len(mine)
    with context:
        table = compute_reference(
            scorer,
            pairs,
            mine,
            device=setup.device,
            pad_id=setup.pad_id,
            all_reduce_sum=setup.all_reduce_sum,
            padding=batches[:1] * (rounds - len(mine)),
        )
    reshard_after_no_grad(scorer)
    del scorer
    if setup.rank == 0:
        ReferenceCache(setup.cache_dir).save(key, table)
    reporter.event(
        "reference",
        f"reference log-probs computed for {len(pairs)} pairs in {time.perf_counter() - started:.1f}s",
        {"key": key, "cached": False},
    )
    return table


def _cached(setup: ReferenceSetup, data: PreparedData) -> tuple[str, ReferenceTable | None]:
    """Rank 0: the table's cache key and the cached table (None on a miss)."""
    spec = setup.spec
    pairs = data.train + data.eval
    model_fp = model_fingerprint(spec.model)
    if compute_dtype(spec.training.precision, setup.device) != torch.float32:  # bf16 log-probs differ
        model_fp += "|bf16"
    key = cache_key(model_fp, data.fingerprint, pairs, spec.training.max_length)
    table = ReferenceCache(setup.cache_dir).load(key)
    if table is None or table.chosen.numel() != len(pairs):
        return key, None
    return key, table

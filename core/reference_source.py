"""Where a step's reference log-probs come from: a cached precomputed table, a live model, or nothing.

Precomputed (the default): one no-grad pass before training. Before any update the policy *is* the
reference (with LoRA: the base model, adapters disabled), so no second model is loaded; only a run
that resumes without a cached table loads the reference weights, and frees them after the pass.
Live: a frozen copy (or, with LoRA, the policy with adapters disabled) scores every batch.
"""

from __future__ import annotations

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
from core.reference import ReferenceCache, ReferenceTable, cache_key, compute_reference
from core.reporting import Reporter
from core.scoring import PairScorer, scorer_for
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
                live=scorer_for(policy, spec.training, setup.device),
                live_context=lambda: adapters_disabled(policy),
            )
        ref = load_model(spec.model, allow_remote_code=setup.allow_remote_code, device=setup.device)
        return ReferenceSource(
            setup.device, live=scorer_for(ref.eval().requires_grad_(False), spec.training, setup.device)
        )
    return ReferenceSource(setup.device, table=_precomputed_table(setup, data, policy, resumed, reporter))


def _precomputed_table(
    setup: ReferenceSetup, data: PreparedData, policy: nn.Module, resumed: bool, reporter: Reporter
) -> ReferenceTable:
    spec = setup.spec
    pairs = data.train + data.eval
    model_fp = model_fingerprint(spec.model)
    if compute_dtype(spec.training.precision, setup.device) != torch.float32:  # bf16 log-probs differ
        model_fp += "|bf16"
    key = cache_key(model_fp, data.fingerprint, pairs, spec.training.max_length)
    cache = ReferenceCache(setup.cache_dir)
    table = cache.load(key)
    if table is not None and table.chosen.numel() == len(pairs):
        reporter.event("reference", "reference log-probs reused from cache", {"key": key, "cached": True})
        return table
    started = time.perf_counter()
    ref_model: nn.Module | None = None
    if resumed and not is_peft(policy):  # the policy has moved: load the reference weights for this pass
        ref_model = load_model(spec.model, allow_remote_code=setup.allow_remote_code, device=setup.device)
        scorer, context = scorer_for(ref_model, spec.training, setup.device), nullcontext()
    else:
        scorer, context = scorer_for(policy, spec.training, setup.device), adapters_disabled(policy)
    # longest packed rows first, cut into batches: neighbours have similar widths, so little padding
    width = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -width[i])
    size = spec.training.batch_size
    batches = [order[k : k + size] for k in range(0, len(order), size)]
    mine = [b for k, b in enumerate(batches) if k % setup.world_size == setup.rank]
    with context:
        table = compute_reference(
            scorer, pairs, mine, device=setup.device, pad_id=setup.pad_id, all_reduce_sum=setup.all_reduce_sum
        )
    del ref_model, scorer
    if setup.rank == 0:
        cache.save(key, table)
    reporter.event(
        "reference",
        f"reference log-probs computed for {len(pairs)} pairs in {time.perf_counter() - started:.1f}s",
        {"key": key, "cached": False},
    )
    return table

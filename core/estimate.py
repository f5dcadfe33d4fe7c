"""Before launch: the tokens, optimizer steps, FLOPs and (from measured throughput) duration of a job."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.schemas import EstimateOut
from core.spec import JobSpec

if TYPE_CHECKING:  # torch-backed; imported where used, so the API starts without torch
    from core.data import PreparedData

#: Epochs planned batch by batch when several workers drop different leftover pairs each epoch; later
#: epochs are counted at the mean of these (the basis says so).
MAX_PLANNED_EPOCHS = 64


@dataclass(frozen=True)
class Throughput:
    """Training tokens per second measured on this cluster, and a sentence on where it comes from."""

    tokens_per_second: float
    basis: str


@dataclass(frozen=True)
class StepPlan:
    """Optimizer steps and the tokens the loop's steps consume (its `num_tokens` counter at the end)."""

    steps: int
    steps_per_epoch: int
    total_tokens: int
    exact: bool


def plan_steps(
    lengths: Sequence[int], widths: Sequence[int], spec: JobSpec, world_size: int | None = None
) -> StepPlan:
    """Replay the loop's batch plan (LengthGroupedBatches per rank, grad accumulation, epochs or max_steps).

    ``lengths`` order the batches (EncodedPair.length); ``widths`` are what a packed batch counts as
    tokens (prompt + chosen + rejected). Summed over every rank, as the loop all-reduces its counter.
    """
    from core.data import LengthGroupedBatches

    t = spec.training
    world = world_size or spec.resources.num_workers
    plans = [
        LengthGroupedBatches(lengths, t.batch_size, t.seed, rank=r, world_size=world) for r in range(world)
    ]
    per_epoch = plans[0].num_batches()
    if per_epoch == 0:
        return StepPlan(0, 0, 0, exact=True)
    steps_per_epoch = math.ceil(per_epoch / t.grad_accum_steps)
    steps = t.max_steps or t.epochs * steps_per_epoch
    full, rest = divmod(steps * t.grad_accum_steps, per_epoch)

    def epoch_tokens(epoch: int, batches: int | None = None) -> int:
        return sum(widths[i] for plan in plans for batch in plan.epoch(epoch)[:batches] for i in batch)

    if world == 1:  # every pair once per epoch
        planned = [sum(widths)] * full
    else:
        planned = [epoch_tokens(e) for e in range(min(full, MAX_PLANNED_EPOCHS))]
    total = sum(planned)
    if full > len(planned):
        total += round(total / len(planned) * (full - len(planned)))
    if rest:
        total += epoch_tokens(full, rest)
    return StepPlan(steps, steps_per_epoch, total, exact=full <= len(planned))


def estimate(
    spec: JobSpec,
    data: PreparedData,
    parameters: int | None,
    throughput: Throughput | None,
    params_basis: str,
) -> EstimateOut:
    """The estimate of a validated spec over its prepared (tokenised, truncated) data."""
    from core.losses import WeightedLoss
    from core.packing import pair_width
    from core.sft import chosen_width

    t, world = spec.training, spec.resources.num_workers
    width = chosen_width if spec.loss.is_sft else pair_width  # an sft row holds no rejected answer
    widths = [width(p) for p in data.train]
    plan = plan_steps([p.length for p in data.train], widths, spec)
    eval_tokens = sum(width(p) for p in data.eval)
    per_step = plan.total_tokens / plan.steps if plan.steps else 0.0
    counted = "prompt + chosen" if spec.loss.is_sft else "prompt + chosen + rejected"
    basis = {
        "tokens": f"{counted} tokens of each pair after tokenisation and truncation to "
        f"max_length {t.max_length} (the same data preparation as the training loop)",
        "steps": (
            f"max_steps {t.max_steps}"
            if t.max_steps
            else f"{t.epochs} epochs × {plan.steps_per_epoch} steps per epoch"
        )
        + f"; {t.batch_size} pairs per batch per worker × {t.grad_accum_steps} accumulated batches × "
        f"{world} workers; total_train_tokens replays the loop's length-grouped batch plan"
        + ("" if plan.exact else f" (epochs after {MAX_PLANNED_EPOCHS} counted at the mean epoch)"),
    }
    flops_per_step = total_flops = None
    if parameters is None:
        basis["flops"] = f"not computed: {params_basis}"
    else:
        needs_reference = WeightedLoss(
            spec.loss.names, spec.loss.weight_values, spec.loss.beta, spec.loss.extra()
        ).needs_reference
        live = needs_reference and not t.precompute_ref_logps
        flops_per_step = (6 + (2 if live else 0)) * parameters * per_step
        cached = 2 * parameters * (sum(widths) + eval_tokens) if needs_reference and not live else 0
        total_flops = flops_per_step * plan.steps + cached
        formula = "6 × parameters × tokens per step (policy forward and backward)"
        if live:
            formula += " + 2 × parameters × tokens per step (live reference forward)"
        if cached:
            formula += "; total adds 2 × parameters × (train + eval tokens) for the cached reference pass"
        if not needs_reference:
            formula += "; the loss needs no reference"
        basis["flops"] = f"{formula}; parameters {parameters} ({params_basis})"
    duration = None
    if throughput is None:
        basis["duration"] = "null: this cluster has no measured throughput of a succeeded job like this one"
    else:
        duration = plan.total_tokens / throughput.tokens_per_second
        basis["duration"] = (
            f"total_train_tokens / {throughput.tokens_per_second:.6g} tokens/s: {throughput.basis}"
        )
    return EstimateOut(
        train_pairs=len(data.train),
        eval_pairs=len(data.eval),
        train_tokens=sum(widths),
        eval_tokens=eval_tokens,
        steps=plan.steps,
        steps_per_epoch=plan.steps_per_epoch,
        batches_per_step=t.grad_accum_steps,
        total_train_tokens=plan.total_tokens,
        parameters=parameters,
        flops_per_step=flops_per_step,
        total_flops=total_flops,
        duration_s=duration,
        tokens_per_second=throughput.tokens_per_second if throughput else None,
        basis=basis,
    )

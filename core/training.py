"""The preference-optimization loop (torchtune-style recipe): data, reference, optimizer, steps, eval, checkpoints.

Rank and world size come in from outside (`Distributed`); so do the model wrapper (DDP from Ray's
`prepare_model`) and the metric reduction (`all_reduce_sum`). Metrics and events leave through a
`Reporter`. Nothing here knows about HTTP or Ray.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from core.checkpointing import (
    LoopState,
    is_sharded_checkpoint,
    latest_checkpoint,
    load_sharded_state,
    load_trainer_state,
    save_checkpoint,
    save_sharded_checkpoint,
    set_rng_state,
)
from core.data import EncodedPair, LengthGroupedBatches, ValidationReport, prepare_data
from core.data.limits import DEFAULT_LIMITS, DataLimits
from core.losses import MetricSums, WeightedLoss, pair_metrics
from core.models import (
    apply_lora,
    enable_activation_checkpointing,
    is_peft,
    load_lora_checkpoint,
    load_model,
    load_tokenizer,
)
from core.optim import build_optimizer, build_scheduler
from core.packing import PackedBatch, pack_pairs
from core.precision import allow_tf32_for_fp32, compute_dtype
from core.reference_source import ReferenceSetup, ReferenceSource, build_reference
from core.reporting import NullReporter, Reporter
from core.scoring import PairScorer, scorer_for
from core.sharding import fsdp_wrapper, full_model_state_dict, full_tensor
from core.spec import JobSpec

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """A run that cannot go on; `code` is machine-readable, the message tells a person what happened."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Distributed:
    """What the outside world tells the loop about parallelism (defaults: one process)."""

    rank: int = 0
    world_size: int = 1
    all_reduce_sum: Callable[[Tensor], Tensor] | None = None
    wrap_model: Callable[[nn.Module], nn.Module] | None = None


@dataclass
class RunOptions:
    """Where the run writes and how it is controlled."""

    output_dir: Path
    cache_dir: Path | None = None
    device: torch.device | str = "cpu"
    resume_from: Path | Literal["latest"] | None = None
    allow_remote_code: bool = False
    should_stop: Callable[[], bool] | None = None
    data_limits: DataLimits = DEFAULT_LIMITS


@dataclass
class TrainResult:
    """What a finished (or cancelled) run leaves behind."""

    status: Literal["completed", "cancelled"]
    step: int
    total_steps: int
    metrics: dict[str, float]
    eval_metrics: dict[str, float]
    final_model_dir: Path | None
    report: ValidationReport
    extra: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _batch_stream(plan: LengthGroupedBatches, epoch: int, batch: int) -> Iterator[tuple[int, int, list[int]]]:
    """Batches from position (epoch, batch) on, epoch after epoch: (epoch, index in epoch, example indices)."""
    while True:
        batches = plan.epoch(epoch)
        for i in range(batch, len(batches)):
            yield epoch, i, batches[i]
        epoch, batch = epoch + 1, 0


class Trainer:
    """One training run of a JobSpec; `run()` does everything and returns a TrainResult."""

    def __init__(
        self,
        spec: JobSpec,
        options: RunOptions,
        reporter: Reporter | None = None,
        dist: Distributed | None = None,
    ) -> None:
        self.spec = spec
        self.options = options
        self.reporter = reporter or NullReporter()
        self.dist = dist or Distributed()
        self.device = torch.device(options.device)
        self.loss_fn = WeightedLoss(
            spec.loss.names, spec.loss.weight_values, spec.loss.beta, spec.loss.extra()
        )
        self.checkpoint_root = options.output_dir / "checkpoints"
        # FSDP2 needs a process group; one process without one runs unsharded
        self.fsdp = spec.resources.strategy == "fsdp" and torch.distributed.is_initialized()

    # ----- set-up -------------------------------------------------------------------------
    def _resume_checkpoint(self) -> Path | None:
        r = self.options.resume_from
        if r is None:
            return None
        if r == "latest":
            return latest_checkpoint(self.checkpoint_root)
        return Path(r)

    def _load_policy(self, checkpoint: Path | None) -> nn.Module:
        spec = self.spec
        allow = self.options.allow_remote_code
        if checkpoint is None or is_sharded_checkpoint(checkpoint):  # shards are loaded after sharding
            policy = load_model(spec.model, allow_remote_code=allow, device=self.device)
            return apply_lora(policy, spec.lora) if spec.lora else policy
        if spec.lora:
            base = load_model(spec.model, allow_remote_code=allow, device=self.device)
            return load_lora_checkpoint(base, checkpoint / "model").to(self.device)
        return load_model(
            spec.model, allow_remote_code=allow, device=self.device, path_override=checkpoint / "model"
        )

    @staticmethod
    def _enable_checkpointing(policy: nn.Module) -> None:
        try:
            enable_activation_checkpointing(policy)
        except ValueError as exc:
            raise TrainingError(
                "gradient_checkpointing_unsupported",
                f"training.gradient_checkpointing is not supported by this model: {exc}",
            ) from exc

    # ----- the loop -------------------------------------------------------------------------
    def run(self) -> TrainResult:
        spec, t, dist = self.spec, self.spec.training, self.dist
        seed_everything(t.seed)
        self.reporter.event("preparing", "preparing data and model")
        tokenizer = load_tokenizer(spec.model, allow_remote_code=self.options.allow_remote_code)
        self.pad_id = int(tokenizer.pad_token_id)
        data = prepare_data(spec.dataset, tokenizer, t.max_length, t.seed, limits=self.options.data_limits)
        self.reporter.event("data", data.report.to_text(), data.report.model_dump(mode="json"))

        checkpoint = self._resume_checkpoint()
        policy = self._load_policy(checkpoint)
        dtype = compute_dtype(t.precision, self.device)
        precision = "bf16" if dtype == torch.bfloat16 else "fp32"
        allow_tf32_for_fp32(dtype, self.device)
        if t.gradient_checkpointing:
            self._enable_checkpointing(policy)
        reference = build_reference(
            ReferenceSetup(
                spec,
                self.device,
                self.pad_id,
                self.options.cache_dir or self.options.output_dir / "cache",
                self.options.allow_remote_code,
                dist.rank,
                dist.world_size,
                dist.all_reduce_sum,
            ),
            data,
            policy,
            needs_reference=self.loss_fn.needs_reference,
            resumed=checkpoint is not None,
            reporter=self.reporter,
        )

        scorer = scorer_for(policy, t, self.device)
        scorer.train()
        wrap = dist.wrap_model
        if self.fsdp:
            if spec.lora:
                raise TrainingError(
                    "fsdp_lora_unsupported", "resources.strategy fsdp does not support lora yet"
                )
            scorer.compute_dtype = torch.float32  # FSDP's MixedPrecisionPolicy casts instead of autocast
            wrap = wrap or fsdp_wrapper(self.device, dtype)
        train_scorer = wrap(scorer) if wrap else scorer
        optimizer = build_optimizer(scorer, t)
        plan = LengthGroupedBatches(
            [p.length for p in data.train], t.batch_size, t.seed, rank=dist.rank, world_size=dist.world_size
        )
        if plan.num_batches() == 0:
            raise TrainingError(
                "dataset_too_small", f"{len(data.train)} training pairs make no batch of {t.batch_size}"
            )
        steps_per_epoch = math.ceil(plan.num_batches() / t.grad_accum_steps)
        total_steps = t.max_steps or t.epochs * steps_per_epoch
        scheduler = build_scheduler(optimizer, t, total_steps)

        loop = LoopState()
        if checkpoint is not None:
            state = load_trainer_state(checkpoint)
            if state.get("sharded"):
                load_sharded_state(checkpoint, scorer, optimizer)
            else:
                optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            loop = state["loop"]
            set_rng_state(state["rng"])
            self.reporter.event(
                "resumed", f"resumed from {checkpoint.name} at step {loop.step}", {"step": loop.step}
            )
        self.reporter.event(
            "started",
            f"training {total_steps} steps on {len(data.train)} pairs in {precision}",
            {
                "total_steps": total_steps,
                "start_step": loop.step,
                "train_pairs": len(data.train),
                "precision": precision,
            },
        )

        stream = _batch_stream(plan, loop.epoch, loop.batch_in_epoch)
        params = [p for p in scorer.parameters() if p.requires_grad]
        metrics: dict[str, float] = {}
        eval_metrics: dict[str, float] = {}
        status: Literal["completed", "cancelled"] = "completed"
        while loop.step < total_steps:
            if self.options.should_stop is not None and self.options.should_stop():
                status = "cancelled"
                break
            started = time.perf_counter()
            sums, tokens, slots = MetricSums(), 0, 0
            for micro in range(t.grad_accum_steps):
                epoch, index, idx = next(stream)
                batch = pack_pairs([data.train[i] for i in idx], idx, self.pad_id).to(self.device)
                tokens, slots = tokens + batch.num_tokens, slots + batch.segments.numel()
                sync = micro == t.grad_accum_steps - 1 or not hasattr(train_scorer, "no_sync")
                if self.fsdp:  # FSDP2: reduce-scatter on the last micro-batch only
                    train_scorer.set_requires_gradient_sync(micro == t.grad_accum_steps - 1)
                with nullcontext() if sync else train_scorer.no_sync():
                    per_pair, values = self._score(train_scorer, batch, reference)
                    (per_pair.mean() / t.grad_accum_steps).backward()
                sums.add(values)
                loop.epoch, loop.batch_in_epoch = (epoch, index + 1)
            reduced = sums.reduce(dist.all_reduce_sum)
            if not math.isfinite(reduced["loss"]):
                raise TrainingError("non_finite_loss", f"loss is {reduced['loss']} at step {loop.step + 1}")
            max_norm = t.max_grad_norm if t.max_grad_norm is not None else float("inf")
            grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm)))
            if not math.isfinite(grad_norm):
                raise TrainingError(
                    "non_finite_gradient", f"gradient norm is {grad_norm} at step {loop.step + 1}"
                )
            lr = float(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loop.step += 1
            counts = self._all_reduce(torch.tensor([tokens, slots], dtype=torch.float64))
            loop.num_tokens += int(counts[0])
            elapsed = time.perf_counter() - started
            metrics = {
                **reduced,
                "learning_rate": lr,
                "grad_norm": grad_norm,
                "epoch": loop.epoch + loop.batch_in_epoch / plan.num_batches(),
                "num_tokens": float(loop.num_tokens),
                "padding_fraction": 1.0 - float(counts[0]) / max(1.0, float(counts[1])),
                "pairs_per_second": sums.count * dist.world_size / max(elapsed, 1e-9),
                "step_time": elapsed,
            }
            if loop.step % t.log_every == 0 or loop.step == total_steps:
                self.reporter.metrics(loop.step, metrics)
            if t.eval_every and data.eval and loop.step % t.eval_every == 0:
                eval_metrics = self.evaluate(scorer, data.eval, len(data.train), reference)
                self.reporter.metrics(loop.step, eval_metrics)
            if t.checkpoint_every and loop.step % t.checkpoint_every == 0 and loop.step < total_steps:
                self._checkpoint(scorer, optimizer, scheduler, loop, metrics)

        if data.eval and status == "completed" and not (t.eval_every and loop.step % t.eval_every == 0):
            eval_metrics = self.evaluate(scorer, data.eval, len(data.train), reference)
            self.reporter.metrics(loop.step, eval_metrics)
        final_dir = self._save_final(scorer, tokenizer) if status == "completed" else None
        if status == "cancelled":
            self._checkpoint(scorer, optimizer, scheduler, loop, metrics)
        self.reporter.event(status, f"training {status} at step {loop.step}", {"step": loop.step})
        return TrainResult(status, loop.step, total_steps, metrics, eval_metrics, final_dir, data.report)

    # ----- pieces of a step -------------------------------------------------------------------
    def _all_reduce(self, tensor: Tensor) -> Tensor:
        return self.dist.all_reduce_sum(tensor) if self.dist.all_reduce_sum else tensor

    def _score(
        self, scorer: nn.Module, batch: PackedBatch, reference: ReferenceSource, offset: int = 0
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-pair loss of one packed batch and its per-pair metrics."""
        scores = scorer(batch)
        rc, rr = reference.logps(batch, offset=offset)
        per_pair = self.loss_fn(
            scores.chosen_logps,
            scores.rejected_logps,
            rc,
            rr,
            chosen_lengths=batch.chosen_lengths,
            rejected_lengths=batch.rejected_lengths,
        )
        return per_pair, self._pair_metrics(per_pair, scores, rc, rr)

    def _pair_metrics(self, per_pair: Tensor, scores: Any, rc: Tensor, rr: Tensor) -> dict[str, Tensor]:
        return pair_metrics(
            per_pair,
            scores.chosen_logps,
            scores.rejected_logps,
            rc,
            rr,
            beta=self.spec.loss.beta,
            chosen_logits_mean=scores.chosen_logits_mean,
            rejected_logits_mean=scores.rejected_logits_mean,
        )

    def evaluate(
        self,
        scorer: PairScorer,
        pairs: list[EncodedPair],
        offset: int,
        reference: ReferenceSource,
    ) -> dict[str, float]:
        """Held-out metrics (``eval/`` prefix) over this rank's share of the eval pairs, reduced over ranks."""
        plan = LengthGroupedBatches(
            [p.length for p in pairs],
            self.spec.training.batch_size,
            0,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            shuffle=False,
        )
        sums = MetricSums()
        scorer.eval()
        with torch.no_grad():
            for idx in plan.epoch(0):
                batch = pack_pairs([pairs[i] for i in idx], idx, self.pad_id).to(self.device)
                sums.add(self._score(scorer, batch, reference, offset)[1])
        scorer.train()
        return {f"eval/{k}": v for k, v in sums.reduce(self.dist.all_reduce_sum).items()}

    def _checkpoint(
        self, scorer: PairScorer, optimizer: Any, scheduler: Any, loop: LoopState, metrics: dict
    ) -> None:
        path = None
        keep = self.spec.training.keep_checkpoints
        if self.fsdp:
            path = save_sharded_checkpoint(
                self.checkpoint_root, scorer, optimizer, scheduler, loop, rank=self.dist.rank, keep=keep
            )
        elif self.dist.rank == 0:
            path = save_checkpoint(
                self.checkpoint_root,
                scorer.model,
                optimizer,
                scheduler,
                loop,
                keep=keep,
            )
        self.reporter.checkpoint(loop.step, path, metrics)

    def _save_final(self, scorer: PairScorer, tokenizer: Any) -> Path | None:
        policy = scorer.model
        full = full_model_state_dict(scorer) if self.fsdp else None  # a collective: every rank
        if self.dist.rank != 0:
            return None
        out = self.options.output_dir / "final"
        if full is not None:  # FSDP: rank 0 writes the gathered weights as one HF folder
            policy.save_pretrained(out, state_dict=full, safe_serialization=True)
        else:
            if is_peft(policy):
                policy.save_pretrained(out / "adapter", safe_serialization=True)
                policy = policy.merge_and_unload()
            policy.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        self.reporter.event("final_model", f"final model saved to {out}", {"path": str(out)})
        return out


def train(
    spec: JobSpec, options: RunOptions, reporter: Reporter | None = None, dist: Distributed | None = None
) -> TrainResult:
    """Run one job in this process (or this rank of a distributed job)."""
    return Trainer(spec, options, reporter, dist).run()

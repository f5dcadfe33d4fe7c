"""The preference-optimization recipe (torchtune style): `setup` builds everything, the loop only steps.

`Trainer.setup` loads data, model (sharded with FSDP2 under `resources.strategy: fsdp`), reference
(none for an SFT job, core.sft), optimizer and schedule, and restores a checkpoint;
`Trainer.train_loop` runs the optimizer steps, evaluation (and eval generations, core.generations)
and checkpoints. Rank and world size come in from outside (`Distributed`); so do the DDP wrapper and
the metric reduction. Metrics and events leave through a `Reporter`. Nothing here knows about HTTP or Ray.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from core.checkpointing import (
    LoopState,
    check_resume_position,
    latest_checkpoint,
    load_trainer_state,
    save_checkpoint,
    set_rng_state,
)
from core.data import LengthGroupedBatches, PreparedData, prepare_data
from core.generations import eval_generations
from core.models import is_peft, load_model, load_tokenizer
from core.optim import build_optimizer, build_scheduler
from core.pair_loss import BatchLoss, PairLoss
from core.policy_loading import enable_checkpointing, load_policy
from core.precision import allow_tf32_for_fp32, compute_dtype
from core.reference_source import ReferenceSetup, ReferenceSource, build_reference
from core.reporting import NullReporter, Reporter
from core.run_context import Distributed, RunOptions, TrainingError, TrainResult
from core.scoring import PairScorer, scorer_for
from core.sft import SftLoss
from core.sharded_checkpoint import ShardedSaver, load_full_optimizer_state, load_sharded_state
from core.sharding import full_tensor, load_sharded_scorer, unsharded_copy
from core.spec import JobSpec

__all__ = ["Distributed", "RunOptions", "TrainResult", "Trainer", "TrainingError", "train"]

log = logging.getLogger(__name__)
CPU = torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class RunSetup:
    """Everything `Trainer.setup` builds and the loop steps with."""

    tokenizer: Any
    data: PreparedData
    scorer: PairScorer  # the policy's scorer (sharded in place under FSDP)
    train_scorer: nn.Module  # what the loop calls: the scorer, or its DDP wrapper
    reference: ReferenceSource
    optimizer: torch.optim.Optimizer
    scheduler: Any
    plan: LengthGroupedBatches
    total_steps: int
    loop: LoopState
    precision: Literal["bf16", "fp32"]


class Trainer:
    """One training run of a JobSpec: `setup()` then `train_loop()`; `run()` does both."""

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
        self.batch_loss: BatchLoss = SftLoss() if spec.loss.is_sft else PairLoss(spec.loss)
        self.checkpoint_root = options.output_dir / "checkpoints"
        # FSDP2 needs a process group; one process without one runs unsharded
        self.fsdp = spec.resources.strategy == "fsdp" and torch.distributed.is_initialized()
        self.dtype = compute_dtype(spec.training.precision, self.device)
        self.sharded_saver = (
            ShardedSaver(self.checkpoint_root, self.reporter, self.dist, keep=spec.training.keep_checkpoints)
            if self.fsdp
            else None
        )

    def run(self) -> TrainResult:
        return self.train_loop(self.setup())

    # ----- set-up -------------------------------------------------------------------------
    def setup(self) -> RunSetup:
        """Data, model, reference, optimizer, schedule, and the restored checkpoint state if resuming."""
        spec, t, dist = self.spec, self.spec.training, self.dist
        seed_everything(t.seed)
        self.reporter.event("preparing", "preparing data and model")
        tokenizer = load_tokenizer(spec.model, allow_remote_code=self.options.allow_remote_code)
        self.pad_id = int(tokenizer.pad_token_id)
        data = prepare_data(spec.dataset, tokenizer, t.max_length, t.seed, limits=self.options.data_limits)
        self.reporter.event("data", data.report.to_text(), data.report.model_dump(mode="json"))
        allow_tf32_for_fp32(self.dtype, self.device)

        checkpoint = self._resume_checkpoint()
        saved = load_trainer_state(checkpoint) if checkpoint else None  # memory-mapped, see there
        if saved is not None:  # a resume that cannot continue the data's order is refused before any load
            check_resume_position(saved["loop"], dist.world_size, t.batch_size)
        moved = saved is not None and not saved.get("sharded")  # weights not pretrained
        if self.fsdp:
            # rank 0 reads the weights into CPU memory, each layer goes to the device as it is sharded;
            # the shards start from the pretrained weights and a sharded checkpoint is loaded into them below
            scorer = self._sharded_scorer(lambda: self._load_policy(checkpoint, CPU), trainable=True)
            reference = self._build_reference(data, scorer.model, scorer, resumed=moved)
            train_scorer: nn.Module = scorer
        else:
            policy = self._load_policy(checkpoint)
            if t.gradient_checkpointing:
                enable_checkpointing(policy)
            reference = self._build_reference(data, policy, None, resumed=moved)
            scorer = scorer_for(policy, t, self.device)
            scorer.train()
            train_scorer = dist.wrap_model(scorer) if dist.wrap_model else scorer
        optimizer = build_optimizer(scorer, t)
        plan = LengthGroupedBatches(
            [p.length for p in data.train], t.batch_size, t.seed, rank=dist.rank, world_size=dist.world_size
        )
        if plan.num_batches() == 0:
            raise TrainingError(
                "dataset_too_small", f"{len(data.train)} training pairs make no batch of {t.batch_size}"
            )
        total_steps = t.max_steps or t.epochs * math.ceil(plan.num_batches() / t.grad_accum_steps)
        scheduler = build_scheduler(optimizer, t, total_steps)
        loop = self._restore(checkpoint, saved, scorer, optimizer, scheduler) if saved else LoopState()
        loop.world_size, loop.batch_size = dist.world_size, t.batch_size
        precision: Literal["bf16", "fp32"] = "bf16" if self.dtype == torch.bfloat16 else "fp32"
        return RunSetup(
            tokenizer,
            data,
            scorer,
            train_scorer,
            reference,
            optimizer,
            scheduler,
            plan,
            total_steps,
            loop,
            precision,
        )

    def _resume_checkpoint(self) -> Path | None:
        r = self.options.resume_from
        if r is None:
            return None
        if r == "latest":
            return latest_checkpoint(self.checkpoint_root)
        return Path(r)

    def _load_policy(self, checkpoint: Path | None, device: torch.device | None = None) -> nn.Module:
        allow = self.options.allow_remote_code
        return load_policy(self.spec, checkpoint, device=device or self.device, allow_remote_code=allow)

    def _sharded_scorer(self, load_full: Any, *, trainable: bool) -> PairScorer:
        """A PairScorer over a model that only rank 0 reads (``load_full``), sharded with FSDP2."""
        t = self.spec.training

        def make_scorer(model: nn.Module) -> PairScorer:
            if not trainable:
                model.eval().requires_grad_(False)
            elif t.gradient_checkpointing:
                enable_checkpointing(model)
            scorer = scorer_for(model, t, self.device)
            scorer.compute_dtype = torch.float32  # FSDP's MixedPrecisionPolicy casts instead of autocast
            return scorer.train(trainable)

        return load_sharded_scorer(load_full, make_scorer, self.device, self.dtype)  # type: ignore[return-value]

    def _build_reference(
        self, data: PreparedData, policy: nn.Module, policy_scorer: PairScorer | None, *, resumed: bool
    ) -> ReferenceSource:
        if not self.batch_loss.needs_reference:  # no reference model, no pass, no cache
            return ReferenceSource(self.device)
        dist = self.dist
        load_sharded = None
        if self.fsdp:
            allow = self.options.allow_remote_code

            def load_sharded() -> PairScorer:
                return self._sharded_scorer(
                    lambda: load_model(self.spec.model, allow_remote_code=allow, device=CPU),
                    trainable=False,
                )

        setup = ReferenceSetup(
            self.spec,
            self.device,
            self.pad_id,
            self.options.cache_dir or self.options.output_dir / "cache",
            self.options.allow_remote_code,
            dist.rank,
            dist.world_size,
            dist.all_reduce_sum,
            policy_scorer=policy_scorer,
            load_sharded=load_sharded,
        )
        return build_reference(
            setup,
            data,
            policy,
            needs_reference=self.batch_loss.needs_reference,
            resumed=resumed,
            reporter=self.reporter,
        )

    def _restore(
        self, checkpoint: Path, state: dict, scorer: Any, optimizer: Any, scheduler: Any
    ) -> LoopState:
        if state.get("sharded"):  # onto any world size, sharded or not
            load_sharded_state(checkpoint, scorer, optimizer)
        elif self.fsdp:  # a DDP checkpoint: its full optimizer state, sliced for each rank
            load_full_optimizer_state(scorer, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        loop: LoopState = state["loop"]
        self.reporter.event(
            "resumed", f"resumed from {checkpoint.name} at step {loop.step}", {"step": loop.step}
        )
        return loop

    # ----- the loop -------------------------------------------------------------------------
    def train_loop(self, s: RunSetup) -> TrainResult:
        """Optimizer steps until the schedule ends or the run is stopped; then eval and the final model."""
        t, loop = self.spec.training, s.loop
        self.reporter.event(
            "started",
            f"training {s.total_steps} steps on {len(s.data.train)} pairs in {s.precision}",
            {
                "total_steps": s.total_steps,
                "start_step": loop.step,
                "train_pairs": len(s.data.train),
                "precision": s.precision,
            },
        )
        stream = s.plan.stream(loop.epoch, loop.batch_in_epoch)
        metrics: dict[str, float] = {}
        eval_metrics: dict[str, float] = {}
        status: Literal["completed", "cancelled"] = "completed"
        while loop.step < s.total_steps:
            if self.options.should_stop is not None and self.options.should_stop():
                status = "cancelled"
                break
            metrics = self._step(s, stream)
            if self.sharded_saver is not None:
                self.sharded_saver.poll()  # a checkpoint is published once written; the step never waits
            if loop.step % t.log_every == 0 or loop.step == s.total_steps:
                self.reporter.metrics(loop.step, metrics)
            if t.eval_every and s.data.eval and loop.step % t.eval_every == 0:
                eval_metrics = self._eval_and_report(s)
            if t.checkpoint_every and loop.step % t.checkpoint_every == 0 and loop.step < s.total_steps:
                self._checkpoint(s, metrics)

        if s.data.eval and status == "completed" and not (t.eval_every and loop.step % t.eval_every == 0):
            eval_metrics = self._eval_and_report(s)
        if status == "cancelled":
            self._checkpoint(s, metrics)
        if self.sharded_saver is not None:  # the last checkpoint is durable and reported before the end
            self.sharded_saver.close()
        final_dir = None
        if status == "completed":
            s.optimizer.state.clear()  # its moments (2x the weights) are not needed for the final model
            final_dir = self._save_final(s.scorer, s.tokenizer)
        self.reporter.event(status, f"training {status} at step {loop.step}", {"step": loop.step})
        return TrainResult(status, loop.step, s.total_steps, metrics, eval_metrics, final_dir, s.data.report)

    def _step(self, s: RunSetup, stream: Iterator[tuple[int, int, list[int]]]) -> dict[str, float]:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns the step's metrics."""
        t, loop, model = self.spec.training, s.loop, s.train_scorer
        started = time.perf_counter()
        sums, tokens, slots = self.batch_loss.new_sums(), 0, 0
        for micro in range(t.grad_accum_steps):
            epoch, index, idx = next(stream)
            pairs = [s.data.train[i] for i in idx]
            batch = self.batch_loss.pack(s.scorer.layout, pairs, idx, self.pad_id).to(self.device)
            tokens, slots = tokens + batch.num_tokens, slots + batch.segments.numel()
            last = micro == t.grad_accum_steps - 1
            if self.fsdp:  # FSDP2: reduce-scatter on the last micro-batch only
                model.set_requires_gradient_sync(last)  # type: ignore[operator]
            no_sync = not last and hasattr(model, "no_sync")  # DDP: all-reduce on the last one only
            with model.no_sync() if no_sync else nullcontext():  # type: ignore[operator]
                loss, values = self.batch_loss(model, batch, s.reference)
                (loss / t.grad_accum_steps).backward()
            sums.add(values)
            loop.epoch, loop.batch_in_epoch = (epoch, index + 1)
        reduced = sums.reduce(self.dist.all_reduce_sum)
        if not math.isfinite(reduced["loss"]):
            raise TrainingError("non_finite_loss", f"loss is {reduced['loss']} at step {loop.step + 1}")
        max_norm = t.max_grad_norm if t.max_grad_norm is not None else float("inf")
        params = [p for p in s.scorer.parameters() if p.requires_grad]
        grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm)))
        if not math.isfinite(grad_norm):
            raise TrainingError(
                "non_finite_gradient", f"gradient norm is {grad_norm} at step {loop.step + 1}"
            )
        lr = float(s.scheduler.get_last_lr()[0])
        s.optimizer.step()
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
        loop.step += 1
        counts = self._all_reduce(torch.tensor([tokens, slots], dtype=torch.float64))
        loop.num_tokens += int(counts[0])
        elapsed = time.perf_counter() - started
        return {
            **reduced,
            "learning_rate": lr,
            "grad_norm": grad_norm,
            "epoch": loop.epoch + loop.batch_in_epoch / s.plan.num_batches(),
            "num_tokens": float(loop.num_tokens),
            "padding_fraction": 1.0 - float(counts[0]) / max(1.0, float(counts[1])),
            "pairs_per_second": sums.count * self.dist.world_size / max(elapsed, 1e-9),
            "step_time": elapsed,
        }

    def _all_reduce(self, tensor: Tensor) -> Tensor:
        return self.dist.all_reduce_sum(tensor) if self.dist.all_reduce_sum else tensor

    def evaluate(self, s: RunSetup) -> dict[str, float]:
        """Held-out metrics (``eval/`` prefix) over this rank's share of the eval pairs, reduced over ranks."""
        plan = LengthGroupedBatches(
            [p.length for p in s.data.eval],
            self.spec.training.batch_size,
            0,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            shuffle=False,
        )
        return self.batch_loss.evaluate(
            s.scorer,
            s.data.eval,
            plan,
            s.reference,
            offset=len(s.data.train),
            pad_id=self.pad_id,
            device=self.device,
            all_reduce_sum=self.dist.all_reduce_sum,
        )

    def _eval_and_report(self, s: RunSetup) -> dict[str, float]:
        """Eval metrics, then (training.eval_generations) greedy completions of the first eval prompts."""
        values = self.evaluate(s)
        self.reporter.metrics(s.loop.step, values)
        if self.spec.training.eval_generations:
            samples = eval_generations(s.scorer, s.tokenizer, s.data.eval, self.spec.training, self.device)
            self.reporter.generations(s.loop.step, samples)
        return values

    def _checkpoint(self, s: RunSetup, metrics: dict[str, float]) -> None:
        keep, loop = self.spec.training.keep_checkpoints, s.loop
        if self.sharded_saver is not None:  # written in the background, reported once durable
            self.sharded_saver.start(s.scorer, s.optimizer, s.scheduler, loop, metrics)
            return
        root, path = self.checkpoint_root, None
        if self.dist.rank == 0:
            path = save_checkpoint(root, s.scorer.model, s.optimizer, s.scheduler, loop, keep=keep)
        self.reporter.checkpoint(loop.step, path, metrics)

    def _save_final(self, scorer: PairScorer, tokenizer: Any) -> Path | None:
        # FSDP: a collective (every rank); rank 0 gets the gathered weights as an unsharded CPU model
        policy = unsharded_copy(scorer) if self.fsdp else scorer.model
        if self.dist.rank != 0 or policy is None:
            return None
        out = self.options.output_dir / "final"
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

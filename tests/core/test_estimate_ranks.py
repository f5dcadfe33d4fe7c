"""core.estimate on 2 gloo ranks (spawned in-process, no Ray): the tokens and steps the DDP loop consumes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from core.data import prepare_data
from core.estimate import plan_steps
from core.models import load_tokenizer, make_tiny_model
from core.packing import pair_width
from core.reporting import NullReporter
from core.spec import JobSpec
from core.training import Distributed, RunOptions, train
from tests.conftest import GPT2_FILE
from tests.core.gloo_ranks import all_reduce_sum, spawn_gloo

# 21 pairs of mixed lengths: with 2 ranks × 2 pairs a step leaves one pair over, which each epoch drops.
PAIRS = [
    {
        "prompt": "Tell me more. " * (i % 4 + 1),
        "chosen": " yes" * (2 + i % 5),
        "rejected": " no" * (1 + i % 3),
    }
    for i in range(21)
]


class Tokens(NullReporter):
    def __init__(self) -> None:
        self.num_tokens = 0.0

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.num_tokens = values.get("num_tokens", self.num_tokens)


def _rank_main(rank: int, spec_json: str, out: str) -> None:
    recorder = Tokens()
    wrap = torch.nn.parallel.DistributedDataParallel
    result = train(
        JobSpec.model_validate_json(spec_json),
        RunOptions(output_dir=Path(out)),
        recorder,
        Distributed(rank, 2, all_reduce_sum, wrap),
    )
    (Path(out) / f"rank{rank}.json").write_text(json.dumps([result.total_steps, recorder.num_tokens]))


def test_two_ranks_consume_the_estimated_tokens(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "tiny", tokenizer=GPT2_FILE, size="tiny", seed=0)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS), encoding="utf-8")
    body: dict[str, Any] = {
        "name": "ranks",
        "model": str(model),
        "dataset": {"train": str(data)},
        "loss": {"type": "sigmoid"},
        "resources": {"num_workers": 2},
        "training": {"batch_size": 2, "max_steps": 12, "max_length": 32, "precision": "fp32"},
    }
    spec = JobSpec.model_validate(body)
    prepared = prepare_data(spec.dataset, load_tokenizer(spec.model), 32, spec.training.seed)
    plan = plan_steps([p.length for p in prepared.train], [pair_width(p) for p in prepared.train], spec)
    assert plan.exact and plan.steps == 12 and plan.steps_per_epoch == 5

    spawn_gloo(_rank_main, spec.model_dump_json(), str(tmp_path / "run"))
    for rank in range(2):
        steps, num_tokens = json.loads((tmp_path / "run" / f"rank{rank}.json").read_text())
        assert (steps, int(num_tokens)) == (plan.steps, plan.total_tokens)

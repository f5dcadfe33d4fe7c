"""Eval generations: greedy decoding equals a manual greedy loop; the loop reports them at each eval step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from core.generations import greedy_decode
from core.models import load_model, load_tokenizer
from core.reporting import NullReporter
from core.spec import JobSpec, ModelSpec
from core.training import RunOptions, train

CPU = torch.device("cpu")
PROMPTS = ["Human: What is the capital of France?\n\nAssistant:", "Hello", "Human: Tell me a story."]


class Generations(NullReporter):
    def __init__(self) -> None:
        self.steps: dict[int, list[dict[str, Any]]] = {}
        self.eval_steps: list[int] = []

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if any(k.startswith("eval/") for k in values):
            self.eval_steps.append(step)

    def generations(self, step: int, samples: list[dict[str, Any]]) -> None:
        self.steps[step] = samples


def manual_greedy(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    """Argmax of the last position, appended, again: no cache, no padding, no batching."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=torch.tensor([ids])).logits
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[Any, Any]:
    spec = ModelSpec(path=str(tiny_model_dir))
    model = load_model(spec, device=CPU).eval()
    return model, load_tokenizer(spec)


def test_batched_greedy_decode_equals_a_manual_greedy_loop(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]  # different lengths: left padding in the batch
    with torch.no_grad():
        got = greedy_decode(
            model, prompts, max_new_tokens=6, pad_id=tokenizer.pad_token_id, eos_id=None, device=CPU
        )
        again = greedy_decode(
            model, prompts, max_new_tokens=6, pad_id=tokenizer.pad_token_id, eos_id=None, device=CPU
        )
    assert got == [manual_greedy(model, p, 6) for p in prompts]
    assert again == got


def test_completion_stops_before_the_first_eos(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    full = [manual_greedy(model, p, 6) for p in prompts]
    # pretend a token that some completion reaches after its first token is EOS (else its first token)
    later = [c[i] for c in full for i in range(1, len(c)) if c[i] not in c[:i]]
    eos = (later or [full[0][0]])[0]
    with torch.no_grad():
        got = greedy_decode(
            model, prompts, max_new_tokens=6, pad_id=tokenizer.pad_token_id, eos_id=eos, device=CPU
        )
    for completion, expected in zip(got, full, strict=True):
        assert completion == (expected[: expected.index(eos)] if eos in expected else expected)
    assert any(len(c) < 6 for c in got)


def _spec(model: Path, data: Path, **extra: Any) -> JobSpec:
    loss = extra.pop("loss", {"type": "sigmoid", "beta": 0.1})
    return JobSpec.model_validate(
        {
            "name": "gen",
            "model": str(model),
            "dataset": {"train": str(data), "max_rows": 48, "eval_fraction": 0.2},
            "loss": loss,
            "lora": extra.pop("lora", None),
            "training": {
                "batch_size": 4,
                "max_length": 128,
                "learning_rate": 1e-3,
                "max_steps": 4,
                "eval_every": 2,
                "eval_generations": 3,
                "eval_generation_tokens": 5,
                "precision": "fp32",
                **extra,
            },
        }
    )


@pytest.mark.parametrize(
    "extra",
    [{}, {"loss": {"type": "sft"}}, {"lora": {"r": 4}}],
    ids=["dpo", "sft", "lora"],
)
def test_loop_reports_the_same_prompts_greedily_at_each_eval(
    tiny_model_dir: Path, learnable_pairs_file: Path, tmp_path: Path, extra: dict[str, Any]
) -> None:
    spec = _spec(tiny_model_dir, learnable_pairs_file, **extra)
    reporter = Generations()
    result = train(spec, RunOptions(output_dir=tmp_path / "run", device="cpu"), reporter)
    assert result.status == "completed"
    assert sorted(reporter.steps) == reporter.eval_steps == [2, 4]
    first, last = reporter.steps[2], reporter.steps[4]
    assert [s["index"] for s in first] == [0, 1, 2]
    assert [(s["prompt"], s["chosen"]) for s in first] == [(s["prompt"], s["chosen"]) for s in last]
    assert all(s["prompt"] and s["chosen"].startswith(" ") for s in first)
    tokenizer = load_tokenizer(spec.model)
    for sample in first + last:
        assert len(tokenizer(sample["completion"])["input_ids"]) <= 5 + 1  # re-tokenising may split a token


@pytest.mark.slow
def test_the_final_model_decodes_to_the_last_reported_completions(
    tiny_model_dir: Path, learnable_pairs_file: Path, tmp_path: Path
) -> None:
    """The reported completions are the model's own greedy output (the final model, after the last eval)."""
    spec = _spec(tiny_model_dir, learnable_pairs_file, eval_generations=2)
    reporter = Generations()
    result = train(spec, RunOptions(output_dir=tmp_path / "run", device="cpu"), reporter)
    assert result.final_model_dir is not None
    assert len(reporter.steps[4]) == 2
    assert_greedy_output_of(result.final_model_dir, reporter.steps[4])


def assert_greedy_output_of(model_dir: Path, samples: list[dict]) -> None:
    """Each sample's completion is the greedy decode (5 tokens, cut at EOS) of the model in ``model_dir``."""
    final = ModelSpec(path=str(model_dir))
    model, tokenizer = load_model(final, device=CPU).eval(), load_tokenizer(final)
    for sample in samples:
        expected = manual_greedy(model, tokenizer(sample["prompt"])["input_ids"], 5)
        if tokenizer.eos_token_id in expected:
            expected = expected[: expected.index(tokenizer.eos_token_id)]
        assert sample["completion"] == tokenizer.decode(expected, skip_special_tokens=True)


def test_eval_generations_need_an_eval_split(tiny_model_dir: Path, learnable_pairs_file: Path) -> None:
    spec = _spec(tiny_model_dir, learnable_pairs_file).model_dump(mode="json", exclude_none=True)
    spec["dataset"].pop("eval_fraction")
    with pytest.raises(ValidationError, match=r"training\.eval_generations: .*dataset\.eval"):
        JobSpec.model_validate(spec)
    spec["training"]["eval_generations"] = 0
    JobSpec.model_validate(spec)
    spec["dataset"]["eval_fraction"] = 0.2
    spec["training"]["eval_generations"] = 33
    with pytest.raises(ValidationError, match="eval_generations"):
        JobSpec.model_validate(spec)


@pytest.mark.slow
def test_fsdp_ranks_decode_together_and_report_the_sharded_models_greedy_output(
    tiny_model_dir: Path, learnable_pairs_file: Path, tmp_path: Path
) -> None:
    """2 gloo ranks under FSDP2: every rank joins the decode (no hang), both get the same samples, and they
    are the greedy output of the final (gathered) model."""
    from tests.core.test_fsdp import run_two_ranks

    spec = _spec(tiny_model_dir, learnable_pairs_file, max_steps=2, eval_every=None, eval_generations=2)
    spec = spec.model_copy(
        update={"resources": spec.resources.model_copy(update={"strategy": "fsdp", "num_workers": 2})}
    )
    spec.training.batch_size = 2
    ranks = run_two_ranks(spec, tmp_path / "fsdp")
    assert ranks[0]["generations"] == ranks[1]["generations"]
    samples = ranks[0]["generations"]["2"]
    assert len(samples) == 2
    assert_greedy_output_of(tmp_path / "fsdp" / "final", samples)

"""`resources.strategy` in a JobSpec: ddp and fsdp, each with or without lora, precomputed or live reference."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.spec import JobSpec, error_lines


def spec(**extra: object) -> dict:
    return {"name": "s", "model": "var/models/tiny", "dataset": {"train": "d.jsonl"}, **extra}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("precompute", [True, False])
def test_strategies_take_lora_with_either_reference(strategy: str, precompute: bool) -> None:
    job = JobSpec.model_validate(
        spec(resources={"strategy": strategy}, lora={"r": 4}, training={"precompute_ref_logps": precompute})
    )
    assert job.resources.strategy == strategy and job.lora is not None and job.lora.r == 4
    assert job.training.precompute_ref_logps is precompute


def test_an_unknown_strategy_is_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(spec(resources={"strategy": "zero3"}))
    [line] = error_lines(info.value)
    assert line.startswith("resources.strategy")

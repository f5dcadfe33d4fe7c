"""`resources.strategy` in a JobSpec: fsdp with lora is refused with a message naming both fields."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.spec import JobSpec, error_lines


def spec(**extra: object) -> dict:
    return {"name": "s", "model": "var/models/tiny", "dataset": {"train": "d.jsonl"}, **extra}


def test_fsdp_with_lora_is_refused_naming_the_fields() -> None:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(spec(resources={"strategy": "fsdp"}, lora={"r": 4}))
    [line] = error_lines(info.value)
    assert "resources.strategy fsdp" in line and "lora" in line


def test_fsdp_alone_and_lora_under_ddp_are_accepted() -> None:
    assert JobSpec.model_validate(spec(resources={"strategy": "fsdp"})).resources.strategy == "fsdp"
    assert JobSpec.model_validate(spec(lora={"r": 4})).resources.strategy == "ddp"

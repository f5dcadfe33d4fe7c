"""json_loads (orjson with json.loads where they differ): the values json.loads gives, for any stored JSON."""

from __future__ import annotations

import json
import math

import pytest

from core.store.point_reads import json_loads

CASES = [
    '{"seed": 18446744073709551617, "name": "x"}',  # past 64 bits: orjson alone gives a float
    '{"seed": -9223372036854775809}',
    "[9223372036854775807, -9223372036854775808, 18446744073709551615]",
    '{"id": "job_1234567890123456789012"}',  # a long digit run inside a string
    '{"lr": 5e-06, "beta": 0.1, "nested": {"a": [1, 2.5, null, true]}}',
    '{"loss": NaN, "max": Infinity, "min": -Infinity}',  # what json.dumps writes for non-finite floats
    '{"name": "caf\\u00e9 \\ud83d\\ude00"}',
]


@pytest.mark.parametrize("text", CASES)
def test_same_values_as_json_loads(text: str) -> None:
    for given in (text, text.encode()):
        got, expected = json_loads(given), json.loads(text)
        assert json.dumps(got, sort_keys=True) == json.dumps(expected, sort_keys=True)
        assert _types(got) == _types(expected)  # an int stays an int, however large


def test_non_finite_floats_survive() -> None:
    got = json_loads('{"loss": NaN}')
    assert math.isnan(got["loss"])


def _types(value: object) -> object:
    if isinstance(value, dict):
        return {k: _types(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_types(v) for v in value]
    return type(value).__name__

"""The loss registry's names, importable without torch (the spec, the client and the CLI need only these)."""

from __future__ import annotations

LOSS_NAMES: tuple[str, ...] = (
    "minor_dpo",
    "sigmoid",
    "cdpo",
    "robust",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "dpop",
    "simpo",
    "sft",
)

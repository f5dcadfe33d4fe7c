"""Reference log-probs: one no-grad pass over the data, cached on disk under a content key.

The key covers the reference model's bytes (model_fingerprint), the tokenizer and every encoded
example (the data fingerprint) and max_length, so a second run on the same inputs loads the table
instead of running the reference model, and any change to model, tokenizer, data or length
recomputes it. With several ranks each computes a disjoint share and one all-reduce joins them; the
key and the hit-or-miss decision are rank 0's alone (core.reference_source).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from core.packing import PairTokens
from core.scoring import PairScorer

log = logging.getLogger(__name__)


@dataclass
class ReferenceTable:
    """Reference summed log-probs per example index: ``chosen[i]``, ``rejected[i]``."""

    chosen: Tensor
    rejected: Tensor

    def lookup(self, index: Tensor) -> tuple[Tensor, Tensor]:
        return self.chosen[index], self.rejected[index]


def cache_key(model_fp: str, data_fp: str, pairs: Sequence[PairTokens], max_length: int) -> str:
    """Content key of a reference table."""
    h = hashlib.sha256(f"{model_fp}|{data_fp}|{max_length}|{len(pairs)}".encode())
    for p in pairs:
        h.update(repr((list(p.prompt_ids), list(p.chosen_ids), list(p.rejected_ids))).encode())
    return h.hexdigest()[:32]


def compute_reference(
    scorer: PairScorer,
    pairs: Sequence[PairTokens],
    batches: Sequence[Sequence[int]],
    *,
    device: torch.device | str,
    pad_id: int,
    all_reduce_sum: Callable[[Tensor], Tensor] | None = None,
    progress: Callable[[int, int], None] | None = None,
    padding: Sequence[Sequence[int]] = (),
) -> ReferenceTable:
    """Score ``pairs`` with the reference, ``batches`` being this rank's share of example indices.

    ``padding``: batches scored after this rank's share only so that a sharded scorer runs as many
    forward passes on every rank (its collectives must match); their results are dropped.
    """
    n = len(pairs)
    table = torch.zeros(2, n, dtype=torch.float64)
    was_training = scorer.training
    scorer.eval()
    with torch.no_grad():
        for k, idx in enumerate(batches):
            batch = scorer.layout.pack([pairs[i] for i in idx], idx, pad_id).to(device)
            scores = scorer(batch)
            table[0, list(idx)] = scores.chosen_logps.double().cpu()
            table[1, list(idx)] = scores.rejected_logps.double().cpu()
            if progress is not None:
                progress(k + 1, len(batches))
        for idx in padding:
            scorer(scorer.layout.pack([pairs[i] for i in idx], idx, pad_id).to(device))
    scorer.train(was_training)
    if all_reduce_sum is not None:
        table = all_reduce_sum(table)
    return ReferenceTable(table[0].float(), table[1].float())


class ReferenceCache:
    """Reference tables stored as ``<dir>/<key>.pt`` (written atomically)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, key: str) -> Path:
        return self.directory / f"ref-logps-{key}.pt"

    def load(self, key: str) -> ReferenceTable | None:
        path = self.path(key)
        if not path.exists():
            return None
        data = torch.load(path, map_location="cpu", weights_only=True)
        log.info("reference log-probs loaded from cache %s", path)
        return ReferenceTable(data["chosen"], data["rejected"])

    def save(self, key: str, table: ReferenceTable) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"chosen": table.chosen, "rejected": table.rejected}, tmp)
        os.replace(tmp, path)
        return path

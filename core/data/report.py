"""ValidationReport: what a dataset check found (rows used and skipped, token lengths, truncation)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, Field

MAX_SKIPPED_LISTED = 100


class SkippedRow(BaseModel):
    """One row that was not used, and why."""

    line: int = Field(description="1-based line (JSONL) or row number (JSON list, Parquet, dataset folder)")
    reason: str = Field(description="Human-readable reason, e.g. \"missing field 'rejected'\"")
    kind: str = Field(
        description="Short code: invalid_json, missing_field, empty_field, identical, wrong_shape, no_room"
    )
    split: Literal["train", "eval"] = Field(
        "train", description="Which file the row is in (eval = dataset.eval)"
    )


class LengthStats(BaseModel):
    """Percentiles (nearest rank) of a token count over the used rows."""

    p50: int = 0
    p90: int = 0
    p99: int = 0
    max: int = 0

    @classmethod
    def of(cls, values: Sequence[int]) -> LengthStats:
        if not values:
            return cls()
        ordered = sorted(values)
        return cls(
            p50=percentile(ordered, 50),
            p90=percentile(ordered, 90),
            p99=percentile(ordered, 99),
            max=ordered[-1],
        )


class TokenLengths(BaseModel):
    """Token counts before truncation; total = prompt + the longer completion (the length the model sees)."""

    prompt: LengthStats = Field(default_factory=LengthStats)
    chosen: LengthStats = Field(default_factory=LengthStats)
    rejected: LengthStats = Field(default_factory=LengthStats)
    total: LengthStats = Field(default_factory=LengthStats)


def percentile(ordered: Sequence[int], q: float) -> int:
    """Nearest-rank percentile of an ascending sequence (always one of its values)."""
    if not ordered:
        raise ValueError("percentile of an empty sequence")
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return int(ordered[min(rank, len(ordered)) - 1])


class ValidationReport(BaseModel):
    """Dataset check result: returned by ``POST /v1/jobs:validate`` and printed by ``minordpo train``."""

    path: str
    eval_path: str | None = None
    format: str
    max_length: int
    truncate_prompt: bool = True
    rows_total: int = Field(
        description="Rows read (rows_used + rows_skipped); reading stops once max_rows are used"
    )
    rows_used: int
    rows_skipped: int
    skipped: list[SkippedRow] = Field(
        default_factory=list, description=f"The first {MAX_SKIPPED_LISTED}, by line"
    )
    skipped_by_reason: dict[str, int] = Field(default_factory=dict, description="Skipped row counts by kind")
    train_rows: int
    eval_rows: int
    truncated_rows: int
    truncation_rate: float = Field(description="truncated_rows / rows_used")
    token_lengths: TokenLengths = Field(default_factory=TokenLengths)

    def to_text(self) -> str:
        """A few lines for people: counts, skip reasons with the first examples, truncation and lengths."""
        source = self.path if not self.eval_path else f"{self.path} (+ eval {self.eval_path})"
        lines = [
            f"{source} [{self.format}]: {self.rows_total} rows read, {self.rows_used} used "
            f"(train {self.train_rows}, eval {self.eval_rows}), {self.rows_skipped} skipped"
        ]
        if self.rows_skipped:
            kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(self.skipped_by_reason.items()))
            lines.append(f"  skipped by reason: {kinds}")
            for row in self.skipped[:3]:
                where = "eval line" if row.split == "eval" else "line"
                lines.append(f"    {where} {row.line}: {row.reason}")
        lines.append(
            f"  truncated: {self.truncated_rows} rows ({self.truncation_rate:.1%}) at max_length {self.max_length}"
        )
        t = self.token_lengths
        lines.append(
            "  tokens p50/p90/p99/max: "
            + ", ".join(
                f"{name} {s.p50}/{s.p90}/{s.p99}/{s.max}"
                for name, s in (
                    ("prompt", t.prompt),
                    ("chosen", t.chosen),
                    ("rejected", t.rejected),
                    ("total", t.total),
                )
            )
        )
        return "\n".join(lines)

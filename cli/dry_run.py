"""`minordpo submit --dry-run`: the server's check of a spec and its estimate, printed for people."""

from __future__ import annotations

from core.schemas import EstimateOut, ValidationOut


def _quantity(value: float | None, unit: str = "") -> str:
    return "unknown" if value is None else f"{value:.3g}{unit}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def estimate_lines(estimate: EstimateOut) -> list[str]:
    """The estimate as a few `name: value` lines, then the basis of each figure."""
    lines = [
        f"pairs: {estimate.train_pairs} train, {estimate.eval_pairs} eval",
        f"tokens per pass: {estimate.train_tokens} train, {estimate.eval_tokens} eval (after truncation)",
        f"steps: {estimate.steps} ({estimate.steps_per_epoch} per epoch, "
        f"{estimate.batches_per_step} batches per step per worker)",
        f"tokens trained: {estimate.total_train_tokens}",
        f"parameters: {estimate.parameters if estimate.parameters is not None else 'unknown'}",
        f"FLOPs: {_quantity(estimate.flops_per_step)} per step, {_quantity(estimate.total_flops)} in all",
        f"duration: {_duration(estimate.duration_s)}",
        "basis:",
    ]
    lines.extend(f"  {name}: {text}" for name, text in estimate.basis.items())
    return lines


def validation_lines(result: ValidationOut) -> list[str]:
    """What a dry run found: valid or not, warnings, the estimate."""
    lines = [f"valid: {'yes' if result.valid else 'no'} ({result.dataset.rows_used} rows used)"]
    lines.extend(f"warning: {w}" for w in result.warnings)
    if result.estimate is not None:
        lines.extend(estimate_lines(result.estimate))
    return lines

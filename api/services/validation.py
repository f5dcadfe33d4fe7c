"""`POST /v1/jobs:validate`: load the model's tokenizer and run the dataset checks of core.data."""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from typing import Any

from api.errors import ProblemError
from api.services.estimates import History, model_parameters
from api.services.hub_loads import HubLoads
from api.services.specs import CheckedSpec
from core.data.errors import TOO_LARGE, DatasetError
from core.data.limits import DEFAULT_LIMITS, DataLimits
from core.schemas import ValidationOut
from core.spec import JobSpec

log = logging.getLogger("api.validate")


class TokenizerCache:
    """A few loaded tokenizers, keyed by path, revision and the folder's modification time; hub ids load
    through `hub` (threads of their own, a deadline, the offline switch)."""

    def __init__(self, size: int, hub: HubLoads) -> None:
        self.size = size
        self.hub = hub
        self._items: OrderedDict[tuple[str, str | None, float], Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str, revision: str | None, is_hub_id: bool) -> Any:
        mtime = 0.0 if is_hub_id else os.path.getmtime(path)
        key = (path, revision, mtime)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        if is_hub_id:
            self.hub.refuse_offline(path)
            from transformers import AutoTokenizer  # noqa: F401 - imported here, not within the hub's deadline

            tokenizer = self.hub.run(path, lambda: load_tokenizer(path, revision))
        else:
            tokenizer = load_tokenizer(path, None)
        if self.size:
            with self._lock:
                self._items[key] = tokenizer
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
        return tokenizer


def load_tokenizer(path: str, revision: str | None) -> Any:
    """AutoTokenizer from a local folder (or a hub id: call it through HubLoads); never remote code."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=False)
    except Exception as exc:  # transformers raises OSError, ValueError, EnvironmentError, ...
        msg = f"could not load a tokenizer from '{path}': {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        raise ProblemError(422, f"model.path: {msg}", errors=[{"loc": "model.path", "msg": msg}]) from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _dataset_problem(exc: DatasetError, spec: JobSpec) -> ProblemError:
    field = "dataset.eval" if spec.dataset.eval and exc.path == spec.dataset.eval else "dataset.train"
    status = 413 if exc.kind == TOO_LARGE else 422  # a file over MAX_DATASET_BYTES or MAX_JSON_BYTES
    return ProblemError(status, f"{field}: {exc}", errors=[{"loc": field, "msg": str(exc)}])


def _resolver(checked: CheckedSpec) -> Any:
    """Spec values to checked paths; `for_eval` maps dataset.eval (train and eval may share an `hf:` value)."""

    def resolve(value: str) -> str:
        return checked.paths.get(value, value)

    resolve.for_eval = lambda value: checked.resolved.dataset.eval or resolve(value)  # type: ignore[attr-defined]
    return resolve


def validate_spec(
    checked: CheckedSpec,
    tokenizers: TokenizerCache,
    limits: DataLimits = DEFAULT_LIMITS,
    history: History | None = None,
) -> ValidationOut:
    """Run the dataset checks for a policy-checked spec within ``limits`` and estimate the run (blocking:
    call it in a thread); `history` gives this cluster's measured throughput (None: no duration)."""
    from core.data import prepare_data
    from core.estimate import estimate

    spec, resolved = checked.original, checked.resolved
    tokenizer = tokenizers.get(resolved.model.path, spec.model.revision, checked.model_is_hub_id)
    try:
        prepared = prepare_data(
            spec.dataset,
            tokenizer,
            spec.training.max_length,
            spec.training.seed,
            resolve_path=_resolver(checked),
            limits=limits,
        )
    except DatasetError as exc:
        raise _dataset_problem(exc, spec) from exc
    report = prepared.report
    warnings: list[str] = []
    if report.rows_skipped:
        warnings.append(
            f"{report.rows_skipped} of {report.rows_total} rows will be skipped (see dataset.skipped)"
        )
    if report.truncated_rows:
        warnings.append(
            f"{report.truncated_rows} rows ({report.truncation_rate:.1%}) are longer than max_length "
            f"{report.max_length} and will be truncated"
        )
    per_step = spec.training.batch_size * spec.training.grad_accum_steps * spec.resources.num_workers
    if report.train_rows < per_step:
        warnings.append(f"only {report.train_rows} training rows for {per_step} pairs per optimizer step")
    parameters, params_basis = model_parameters(resolved.model.path, checked.model_is_hub_id, tokenizers.hub)
    throughput = history(parameters, resolved) if history is not None else None
    return ValidationOut(
        valid=report.rows_used > 0,
        spec=resolved.model_dump(mode="json"),
        model_is_hub_id=checked.model_is_hub_id,
        dataset=report,
        warnings=warnings,
        estimate=estimate(resolved, prepared, parameters, throughput, params_basis),
    )

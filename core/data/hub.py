"""Hub datasets (`hf:OWNER/NAME`): load one split with datasets.load_dataset and save it where read_rows reads it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from core.data.errors import DatasetError

HUB_PREFIX = "hf:"
# `OWNER/NAME` (or a bare `NAME`): the hub's own id characters, no `..`, no leading `.` or `-`.
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")
HUB_DATASETS_DIR = "hub-datasets"


def is_hub_dataset(value: str | None) -> bool:
    """True for a `hf:` dataset value (checked further by hub_name)."""
    return bool(value) and str(value).startswith(HUB_PREFIX)


def hub_name(value: str) -> str:
    """`OWNER/NAME` of a `hf:OWNER/NAME` value; ValueError with a readable reason when it is not one."""
    name = value[len(HUB_PREFIX) :]
    if ".." in name or not _HUB_NAME.match(name):
        raise ValueError(
            f"'{value[:200]}' is not a hub dataset id: use hf:OWNER/NAME (letters, digits, - _ .)"
        )
    return name


@dataclass(frozen=True)
class HubDatasetRef:
    """One split of a hub dataset, as the spec names it."""

    name: str
    split: str
    subset: str | None = None
    data_dir: str | None = None
    revision: str | None = None

    def key(self) -> str:
        """A stable folder name for this reference."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:32]


def hub_ref(value: str, dataset_spec: Any, *, is_eval: bool = False) -> HubDatasetRef:
    """The reference a DatasetSpec's `train` (or, with is_eval, `eval`: split `hub_eval_split`) value names."""
    return HubDatasetRef(
        name=hub_name(value),
        split=dataset_spec.hub_eval_split if is_eval else dataset_spec.hub_split,
        subset=dataset_spec.hub_subset,
        data_dir=dataset_spec.hub_data_dir,
        revision=dataset_spec.hub_revision,
    )


def offline_reason(value: str) -> str:
    """The one line that refuses a hub dataset while the hub is switched off."""
    return (
        f"'{value}' is a hub dataset, but the hub is offline here (MINORDPO_HUB_OFFLINE or HF_HUB_OFFLINE): "
        "give a local file or an uploaded ds_ id"
    )


def load_hub_dataset(
    value: str,
    ref: HubDatasetRef,
    cache_dir: Path,
    *,
    offline: bool = False,
    mirror_root: Path | None = None,
) -> Path:
    """Load `ref` with datasets.load_dataset (cache under `cache_dir`) and save it as a load_from_disk folder.

    Returns `<cache_dir>/saved/<key>-<fingerprint>`, which read_rows reads row by row (row numbers are
    1-based indices). `mirror_root` (MINORDPO_HUB_DATASETS_ROOT) maps `OWNER/NAME` to the local dataset
    repository folder `<mirror_root>/OWNER/NAME`, read by the same load_dataset code. Raises
    DatasetError (path = `value`) with one line: offline, not found, the hub unreachable, or unreadable.
    Offline (and no mirror) refuses at once.
    """
    if offline and mirror_root is None:  # a local mirror needs no network
        raise DatasetError(offline_reason(value), path=value)
    source = str(mirror_root / ref.name) if mirror_root is not None else ref.name
    if mirror_root is not None and not Path(source).is_dir():
        raise DatasetError(f"dataset '{ref.name}' not found in the hub mirror {mirror_root}", path=value)
    loaded = _load(value, ref, source, cache_dir)
    target = cache_dir / "saved" / f"{ref.key()}-{loaded._fingerprint[:16]}"
    if not (target / "dataset_info.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=target.parent))
        try:
            loaded.save_to_disk(str(staging / "data"))
            _publish(staging / "data", target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _publish(saved: Path, target: Path) -> None:
    """Move a finished save into place; another process that got there first wins."""
    try:
        os.replace(saved, target)
    except OSError:
        if not (target / "dataset_info.json").exists():
            raise


def _load(value: str, ref: HubDatasetRef, source: str, cache_dir: Path) -> Any:
    import datasets

    try:
        loaded = datasets.load_dataset(
            source,
            name=ref.subset,
            data_dir=ref.data_dir,
            revision=ref.revision,
            split=ref.split,
            cache_dir=str(cache_dir),
        )
    except Exception as exc:  # datasets and huggingface_hub raise many unrelated types
        raise DatasetError(_reason(ref, exc), path=value) from exc
    if not isinstance(loaded, datasets.Dataset):  # an IterableDataset or DatasetDict: never with split=
        raise DatasetError(f"split '{ref.split}' of '{ref.name}' did not load as one table", path=value)
    return loaded


def _reason(ref: HubDatasetRef, exc: Exception) -> str:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    kind = type(exc).__name__
    if isinstance(exc, ConnectionError) or "Couldn't reach" in first:
        return f"the hub could not be reached for dataset '{ref.name}' ({first}); check the server's network"
    if "DatasetNotFound" in kind or "doesn't exist on the Hub" in first or isinstance(exc, FileNotFoundError):
        return f"dataset '{ref.name}' not found on the hub (or not visible with this server's token): {first}"
    if isinstance(exc, ValueError) and "split" in first.lower():
        return f"dataset '{ref.name}' has no split '{ref.split}': {first}"
    return f"could not load dataset '{ref.name}' from the hub: {kind}: {first}"


def hub_resolver(
    dataset_spec: Any,
    cache_dir: Path,
    *,
    offline: bool = False,
    mirror_root: Path | None = None,
) -> Callable[[str], str | Path]:
    """A prepare_data `resolve_path`: `hf:` values load through load_hub_dataset, others stay paths.

    Its `for_eval` attribute resolves `dataset.eval` (the split `hub_eval_split`), so train and eval
    may name the same hub dataset.
    """

    def resolve(value: str, is_eval: bool = False) -> str | Path:
        if not is_hub_dataset(value):
            return Path(value)
        try:
            ref = hub_ref(value, dataset_spec, is_eval=is_eval)
        except ValueError as exc:
            raise DatasetError(str(exc), path=value) from exc
        return load_hub_dataset(value, ref, cache_dir, offline=offline, mirror_root=mirror_root)

    resolve.for_eval = lambda value: resolve(value, is_eval=True)  # type: ignore[attr-defined]
    return resolve


def default_resolver(dataset_spec: Any) -> Callable[[str], str | Path]:
    """hub_resolver for this process's environment, as core.settings reads it (not imported: core.data is below it).

    Cache `<MINORDPO_ARTIFACTS_DIR>/hub-datasets`; offline per MINORDPO_HUB_OFFLINE, else HF_HUB_OFFLINE,
    else TRANSFORMERS_OFFLINE (the first one set decides); mirror MINORDPO_HUB_DATASETS_ROOT.
    """
    env = os.environ
    artifacts = Path(env.get("MINORDPO_ARTIFACTS_DIR") or "var/artifacts")
    flag = next(
        (env[n] for n in ("MINORDPO_HUB_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if n in env), ""
    )
    mirror = env.get("MINORDPO_HUB_DATASETS_ROOT") or None
    return hub_resolver(
        dataset_spec,
        artifacts / HUB_DATASETS_DIR,
        offline=flag.strip().upper() in {"1", "ON", "YES", "TRUE"},
        mirror_root=Path(mirror) if mirror else None,
    )

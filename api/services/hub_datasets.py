"""`hf:OWNER/NAME` dataset values for the API: loaded into the artifacts cache on HubLoads' threads, with its deadline."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from api.errors import invalid
from api.services.hub_loads import HubLoads
from core.data.errors import DatasetError
from core.data.hub import HUB_DATASETS_DIR, hub_ref, load_hub_dataset, offline_reason
from core.settings import Settings

#: (value, field, the spec's DatasetSpec, is_eval) -> the local load_from_disk folder the job reads.
HubDatasetLookup = Callable[[str, str, Any, bool], str]


def hub_dataset_lookup(settings: Settings, hub: HubLoads) -> HubDatasetLookup:
    """Load a hub dataset split (datasets.load_dataset, cache `<artifacts_dir>/hub-datasets`) and save it there.

    The load runs on one of `hub`'s threads: the request waits at most MINORDPO_HUB_TIMEOUT_S (a
    timed-out load goes on in the background and fills the cache, so a retry is quick). Offline
    servers refuse at once unless MINORDPO_HUB_DATASETS_ROOT names a local mirror. The job's stored
    spec names the saved folder, so workers (HF_HUB_OFFLINE=1) read it without the hub.
    """
    cache = settings.artifacts_dir / HUB_DATASETS_DIR
    mirror = settings.hub_datasets_root
    offline = hub.offline and mirror is None

    def lookup(value: str, field: str, dataset_spec: Any, is_eval: bool) -> str:
        try:
            ref = hub_ref(value, dataset_spec, is_eval=is_eval)
        except ValueError as exc:
            raise invalid(field, str(exc)) from exc
        if offline:
            raise invalid(field, offline_reason(value))
        try:
            saved = hub.run(
                value,
                lambda: load_hub_dataset(value, ref, cache, mirror_root=mirror),
                loc=field,
                check_offline=False,
            )
        except DatasetError as exc:
            raise invalid(field, exc.reason) from exc
        return str(saved)

    return lookup

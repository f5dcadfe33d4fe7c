"""Every private Ray name the service uses, behind one check of the installed Ray against the tested range.

The names below are not part of Ray's public API and change between releases without notice; they were
read from, and are tested on, the Ray release TESTED_RAY names (pyproject.toml pins Ray to it). On any
other Ray, `supported()` is False and each caller takes its public fallback instead: the warm pool
(workers/warm_pool.py) stays off, Ray Train keeps its default callbacks, Jobs API calls go through Ray's
public client without our per-call timeout, and the cluster's resources come from the public state API.
Jobs run either way. The service calls `check_at_start_up()` once; it says so when Ray is untested.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("workers.ray_compat")

TESTED_RAY = (2, 60)
"""The Ray minor release (major, minor) whose private names this module was written against and tested on;
pyproject.toml pins Ray to it (`>=2.60,<2.61`), any patch release of it counts."""
VERSION_ENV = "_MINORDPO_RAY_VERSION"
"""When set, the Ray version to check instead of the installed one (tests simulate an untested Ray with it)."""
TRAIN_USER_ERROR_ATTR = "_base_exc"
"""Where Ray Train's UserExceptionWithTraceback keeps the loop's own exception (private; on a Ray that
renames it, unwrapping stops there and the wrapper's own text still names the error)."""


def tested_range() -> str:
    """TESTED_RAY as a version specifier, as pyproject.toml pins Ray."""
    major, minor = TESTED_RAY
    return f">={major}.{minor},<{major}.{minor + 1}"


def version_supported(version: str) -> bool:
    """Whether `version` (a Ray version string, e.g. "2.60.1") is a release of TESTED_RAY."""
    found = re.match(r"(\d+)\.(\d+)(?:\.\d+)?$", version.strip())
    return found is not None and (int(found[1]), int(found[2])) == TESTED_RAY


def ray_version() -> str:
    """The Ray version the checks go by: VERSION_ENV when set, else the installed `ray.__version__`."""
    simulated = os.environ.get(VERSION_ENV)
    if simulated:
        return simulated
    import ray

    return str(ray.__version__)


@functools.cache
def supported() -> bool:
    """Whether this process runs a tested Ray, so the private names below may be used (decided once)."""
    return version_supported(ray_version())


@functools.cache
def check_at_start_up() -> bool:
    """`supported()`, with one warning (per process) when it is not: what is off and what still works."""
    if not supported():
        log.warning(
            "Ray %s is outside the tested range (%s): the warm pool is off and only Ray's public APIs "
            "are used; jobs still run, but start slower",
            ray_version(),
            tested_range(),
        )
    return supported()


# -- the Jobs API client (service side) ----------------------------------------------------------------


def jobs_client(address: str, timeout_s: float) -> Any:
    """Ray's `JobSubmissionClient` for `address` (it checks the connection as it is made).

    On the tested Ray every call is given `timeout_s`: Ray's client sets none, and a dashboard that
    accepts connections and never answers would hang the dispatcher and /readyz for good; Ray's client
    makes every request through its private `_do_request`. On another Ray it is Ray's client as it is,
    and such a dashboard holds a call until the connection drops.
    """
    from ray.job_submission import JobSubmissionClient

    if not supported():
        return JobSubmissionClient(address)

    class BoundedJobSubmissionClient(JobSubmissionClient):
        def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", timeout_s)
            return super()._do_request(method, endpoint, **kwargs)

    return BoundedJobSubmissionClient(address)


def cluster_status(client: Any) -> Any:
    """The `requests` response of the dashboard's /api/cluster_status, sent with `client`'s auth headers
    (tested Ray only; elsewhere the state API's node list serves, see workers/ray_jobs_client.py)."""
    return client._do_request("GET", "/api/cluster_status")


def reload_auth_token() -> None:
    """Make this process re-read Ray's token (Ray caches the first one it loads, per process).

    On an untested Ray nothing is reset: a token this process loaded before stays in use. The service
    points Ray at its token before its first Ray call, so only a token changed after that goes unseen.
    """
    if not supported():
        return
    from ray._raylet import AuthenticationTokenLoader

    AuthenticationTokenLoader.instance().reset_cache()


# -- the warm pool (service side, our local head only) -----------------------------------------------


def train_env_vars(env: Mapping[str, str]) -> dict[str, str]:
    """The env_vars Ray Train gives its controller when the driver's environment is `env`."""
    from ray.train.v2._internal.constants import (
        DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
        ENV_VARS_TO_PROPAGATE,
        RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR,
    )

    out = {key: env[key] for key in ENV_VARS_TO_PROPAGATE if key in env}
    out.setdefault(
        RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR, DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE
    )
    return out


def supervisor_runtime_env() -> str:
    """The runtime_env string of the Jobs API's supervisor actor for a job submitted without one."""
    from ray.dashboard.modules.job.job_manager import JobManager
    from ray.runtime_env import RuntimeEnv

    runtime_env = JobManager._get_supervisor_runtime_env(None, None, "", resources_specified=False)  # type: ignore[arg-type]
    return RuntimeEnv(**runtime_env).serialize()


class RayletPrestarter:
    """The raylet's `PrestartWorkers` call: start one idle Python worker for a runtime_env, kept alive idle."""

    def __init__(self, raylet_address: str) -> None:
        self.raylet_address = raylet_address
        self._stub: Any = None

    def prestart(self, serialized_runtime_env: str | None, keep_alive_s: int) -> None:
        from ray._private.grpc_utils import init_grpc_channel
        from ray._private.utils import get_runtime_env_info
        from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc
        from ray.runtime_env import RuntimeEnv

        if self._stub is None:
            self._stub = node_manager_pb2_grpc.NodeManagerServiceStub(init_grpc_channel(self.raylet_address))
        request = node_manager_pb2.PrestartWorkersRequest(
            language=common_pb2.Language.PYTHON, keep_alive_duration_secs=keep_alive_s, num_workers=1
        )
        if serialized_runtime_env is not None:
            info = get_runtime_env_info(RuntimeEnv())
            info.serialized_runtime_env = serialized_runtime_env
            request.runtime_env_info.CopyFrom(info)
        self._stub.PrestartWorkers(request, timeout=10)


# -- Ray Train (the fit task's process) -------------------------------------------------------------


def without_datasets_callback(callbacks: list[Any]) -> list[Any]:
    """`callbacks` less Ray Train's `DatasetsCallback`, which starts a Ray Data `DatasetManager` actor even
    for a run given no Ray datasets; unchanged on an untested Ray (the actor then starts, and idles)."""
    if not supported():
        return callbacks
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    return [cb for cb in callbacks if not isinstance(cb, DatasetsCallback)]

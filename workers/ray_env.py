"""The environment variables our Ray processes run with, and `use_token_auth()`, which each process calls at start-up."""

from __future__ import annotations

import os

AUTH_MODE_ENV = "RAY_AUTH_MODE"
# Environment every Ray process of ours gets (driver, Train controller, Train workers).
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: the controller polls workers this often; at Ray's default every
#   `ray.train.report()` stalls for most of a poll (NOTES-RAY pitfall 1).
# RAY_TRAIN_ENABLE_PRINT_PATCH=0: no log flood when `datasets` fingerprints inside a worker (pitfall 5).
RAY_WORKER_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# For a cluster we start on this machine, bound to loopback, so it is one node: Ray Train's
# PreemptionWatcher (an actor process per run, polling for node drains) has nothing to watch there,
# since draining the only node ends the cluster. A cluster joined through RAY_ADDRESS keeps it.
# Nor does a SIGTERM drain (Ray waits for the node's workers to go idle): work on the only node has
# nowhere to move, and a head that lingers draining is one a second server could take for live.
SINGLE_NODE_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
# On Linux, Ray replaces a node IP of 127.0.0.1 by the host's address (services.resolve_ip_for_localhost),
# and its GCS, raylet, workers and agents then listen on all interfaces or on that address. Off, this
# switch (Ray's, for one-machine clusters on macOS and Windows) keeps the node IP 127.0.0.1, and the tested Ray
# binds every server of the node to 127.0.0.1 only; it also refuses `ray start --address` (joining a
# second node), which a head of this machine alone never needs.
LOOPBACK_ONLY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def use_token_auth() -> None:
    """Make this process's Ray clients send the cluster token (the head enforces it), unless the operator chose a mode.

    Ray reads its auth mode once per process, as `import ray` runs: call this at start-up, before anything
    imports Ray (the dispatcher service and each API worker do). A job's driver inherits the variable
    from the head that starts it.
    """
    os.environ.setdefault(AUTH_MODE_ENV, "token")

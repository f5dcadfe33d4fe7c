"""The dispatcher as a service: connect to Ray (our local head, or RAY_ADDRESS), run the loop on a thread, stop cleanly.

Our local head is checked before each dispatcher pass (at most every HEAD_CHECK_S): when its `ray start`
process or its GCS is gone, a new head is started (on the same ports where it can), and the jobs that
ran on the old one are resubmitted from their checkpoints by the dispatcher's reconciliation (or fail
with `worker_lost` once their retries are spent).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from core.settings import Settings
from core.store import Database, active_jobs
from core.webhooks import project_secret
from workers import ray_compat
from workers.dispatcher import Dispatcher, DriverEnv
from workers.head_state import process_running
from workers.ray_env import use_token_auth
from workers.ray_head import LocalHead, local_head_environment, start_local_head, stop_local_head
from workers.ray_jobs_client import RayJobs, RayUnavailableError, jobs_api_reachable
from workers.warm_pool import WarmPool, idle_cores, job_pool_kinds, should_hold
from workers.webhooks import WebhookSender

log = logging.getLogger("workers.service")
HEAD_CHECK_S = 2.0
"""How often the dispatcher thread checks that our local head still runs."""
HEAD_MISSES = 3
"""Checks in a row whose GCS connection fails before a head whose process still runs is taken for dead."""
CAPACITY_TTL_S = 30.0
"""How long the cluster's CPU and GPU totals are trusted before Ray is asked again."""


class DispatcherService:
    """Owns the Ray connection and the dispatcher thread of one process (`serve` or `dispatcher`)."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.head: LocalHead | None = None
        self.ray_jobs: RayJobs | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._webhook_thread: threading.Thread | None = None
        self._pool_thread: threading.Thread | None = None
        self._pool_stop = threading.Event()
        self._next_head_check = 0.0
        self._head_misses = 0
        self.warm_pool: WarmPool | None = None
        self.webhooks: WebhookSender | None = None

    def _capacity(self) -> Callable[[], dict[str, float]]:
        """The cluster's CPUs and GPUs as Ray reports them, asked at most every CAPACITY_TTL_S (the local
        head's CPUs are the ones it was started with)."""
        cached: dict[str, Any] = {}

        def capacity() -> dict[str, float]:
            if "value" not in cached or time.monotonic() - cached["at"] > CAPACITY_TTL_S:
                assert self.ray_jobs is not None
                try:
                    value = self.ray_jobs.cluster_resources()
                except RayUnavailableError:
                    if self.head is None:
                        raise
                    # a head still registering its node: its CPUs are known, and GPUs are asked again next time
                    return {"CPU": float(self.head.num_cpus), "GPU": 0.0}
                if self.head is not None:
                    value["CPU"] = float(self.head.num_cpus)
                cached.update(value=value, at=time.monotonic())
            return dict(cached["value"])

        return capacity

    def connect(self) -> None:
        """Start (or reuse) the local head, or reach RAY_ADDRESS's Jobs API.

        The start-up of this process's Ray side: token auth for its Ray clients, and the check of the
        installed Ray against the tested range (workers.ray_compat), which says so once when it is not.
        """
        use_token_auth()
        ray_compat.check_at_start_up()
        if self.settings.ray_address:
            address = self.settings.ray_address
            log.info("using the Ray cluster at %s", address)
        else:
            self.head = self._start_head()
            address = self.head.dashboard_url
            log.info(
                "local Ray head %s (%d CPUs), dashboard on loopback",
                self.head.gcs_address,
                self.head.num_cpus,
            )
        self.ray_jobs = RayJobs(address)

    def _start_head(self, ports: dict[str, int] | None = None) -> LocalHead:
        return start_local_head(
            self.settings.ray_state_file,
            num_cpus=self.settings.ray_num_cpus,
            preload=self._warm_pool_wanted(),
            ports=ports,
        )

    def current_ray_jobs(self) -> RayJobs:
        """The Jobs API for the next dispatcher pass: our local head's, replaced first when it has died."""
        assert self.ray_jobs is not None
        head = self.head
        if head is None or time.monotonic() < self._next_head_check:
            return self.ray_jobs
        self._next_head_check = time.monotonic() + HEAD_CHECK_S
        if head.running():
            self._head_misses = 0
            return self.ray_jobs
        # A `ray start` process that is gone is gone; a GCS that does not accept a connection may only be
        # busy (a loaded machine): that must repeat before the head is replaced (and its jobs with it).
        self._head_misses += 1
        if not process_running(head.pid) or self._head_misses >= HEAD_MISSES:
            self._head_misses = 0
            self._replace_head(head)
        return self.ray_jobs

    def _replace_head(self, dead: LocalHead) -> None:
        """Start a new local head in place of `dead` (tried again at the next check when it fails)."""
        log.error("the local Ray head (pid %d) is gone; starting a new one", dead.pid)
        self._pool_stop.set()  # the warm pool of the old head's raylet
        try:
            head = self._start_head(ports=dead.ports)
            ray_jobs = RayJobs(head.dashboard_url)
        except RayUnavailableError as exc:
            log.error("could not start a new local Ray head: %s", exc)
            return
        self.head, self.ray_jobs = head, ray_jobs
        log.warning("new local Ray head %s (pid %d); jobs that ran on the old one are resubmitted",
                    head.gcs_address, head.pid)  # fmt: skip
        self.start_warm_pool()

    def ready(self) -> None:
        """Readiness check: raises when Ray's Jobs API does not answer."""
        if self.ray_jobs is None or not jobs_api_reachable(self.ray_jobs.address):
            raise RayUnavailableError("Ray is not reachable")

    def start(self) -> None:
        if self.ray_jobs is None:
            self.connect()
        assert self.ray_jobs is not None
        dispatcher = Dispatcher(
            self.db,
            self.ray_jobs,
            capacity=self._capacity(),
            max_concurrent=self.settings.max_concurrent_jobs,
            driver_env=DriverEnv.from_settings(self.settings),
            ray_source=self.current_ray_jobs,
            quotas=self.settings.project_quotas,
        )
        self._thread = threading.Thread(
            target=dispatcher.run,
            args=(self._stop, self.settings.dispatch_interval_s),
            name="dispatcher",
            daemon=True,
        )
        self._thread.start()
        self.start_warm_pool()
        self.start_webhooks()

    def _warm_pool_wanted(self) -> bool:
        """Whether our local head keeps warm processes: asked for, and on a tested Ray (the pool rests on
        Ray's private names; on another Ray it stays off, as check_at_start_up said)."""
        return self.settings.ray_warm_workers > 0 and ray_compat.supported()

    def start_warm_pool(self) -> None:
        """Keep warm worker processes on our local head (not on a cluster joined through RAY_ADDRESS)."""
        head = self.head
        if head is None or not self._warm_pool_wanted() or head.node_manager_port is None:
            return
        kinds = job_pool_kinds(local_head_environment(preload=True), self.settings.ray_warm_workers)
        self.warm_pool = WarmPool(head.node_manager_port, kinds)
        self._pool_stop = threading.Event()
        self._pool_thread = threading.Thread(
            target=self.warm_pool.run,
            args=(self._pool_stop, 1.0, self._pool_should_wait),
            name="warm-pool",
            daemon=True,
        )
        self._pool_thread.start()

    def start_webhooks(self) -> None:
        """Start the webhook sender thread (deliveries are owed by whichever process dispatches)."""
        master = self.settings.webhook_master_secret()
        if self.settings.webhook_secret is None:
            log.warning(
                "webhook signing uses the secret generated in %s; every api and dispatcher host must share it "
                "(or set MINORDPO_WEBHOOK_SECRET)",
                self.settings.artifacts_dir / "webhook-secret",
            )
        self.webhooks = WebhookSender(
            self.db,
            lambda project: project_secret(master, project),
            max_attempts=self.settings.webhook_max_attempts,
            backoff_s=self.settings.webhook_backoff_s,
            allow_private=self.settings.webhook_allow_private,
        )
        self._webhook_thread = threading.Thread(
            target=self.webhooks.run,
            args=(self._stop, min(self.settings.dispatch_interval_s, 1.0)),
            name="webhooks",
            daemon=True,
        )
        self._webhook_thread.start()

    def _pool_should_wait(self) -> bool:
        """Whether the warm pool holds its refill now (workers.warm_pool.should_hold: a job starting, or
        jobs running on a machine with no idle core)."""
        with self.db.read() as s:
            steps = [job.step for job in active_jobs(s)]
        return should_hold(steps, idle_cores)

    def stop(self) -> None:
        """Stop the loop; stop our local head too when configured (running jobs resume from checkpoints later)."""
        self._stop.set()
        self._pool_stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for thread in (self._webhook_thread, self._pool_thread):
            if thread is not None:
                thread.join(timeout=30)
        if self.webhooks is not None:
            self.webhooks.close()
        if self.head is not None and self.settings.stop_ray_on_exit:
            log.info("stopping the local Ray head")
            stop_local_head(self.head, self.settings.ray_state_file)

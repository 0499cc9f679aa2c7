"""Wiring of the dispatcher process: settings, Redis, Ray, signals."""

import logging
import os
import signal
import sys
from types import FrameType

import ray

from shared.logs import configure_logging, is_json
from shared.settings import Settings
from shared.storage import open_storage
from shared.store import JobStore, connect, warn_if_redis_evicts
from workers.dispatcher import Dispatcher
from workers.metrics import DispatcherMetrics


def quiet_local_ray() -> None:
    """Settings for a local Ray that this process starts, which its processes inherit from
    this environment (set before `ray.init`; an operator's own values win).

    Ray's log monitor globs its log folder every 0.1 s while it holds under 1,000 files, and
    each warm group adds about ten: measured at ~2% of a core per cluster over a test session.
    New files are looked for every 5 s instead: the dispatcher reads no logs through Ray
    (log_to_driver is off), and the warm groups' drivers, which copy their ranks' lines into
    their group.log, get a new worker's lines up to 5 s later.

    Ray keeps as many idle worker processes as the node has CPUs, started with the first
    driver, for tasks. Nothing of ours runs a task: a warm group's actors have a runtime
    environment of their own, so they never take an idle worker. The two idle workers of a
    2-CPU node cost ~1.2 CPU-s a minute, a fifth of an idle cluster's CPU; none are kept.
    """
    os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
    os.environ.setdefault("LOG_NAME_UPDATE_INTERVAL_S", "5")
    os.environ.setdefault("RAY_num_workers_soft_limit", "0")
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")


def connect_ray(address: str | None) -> str:
    """Join the Ray cluster at `address`, or start a local one; returns its GCS address."""
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        quiet_local_ray()
        # address="local": never attach to some other Ray that happens to run on this machine.
        ray.init(
            address="local",
            include_dashboard=False,
            log_to_driver=False,
        )
    gcs_address: str = ray.get_runtime_context().gcs_address
    return gcs_address


def run_worker(settings: Settings | None = None) -> None:
    settings = settings or Settings()
    configure_logging(settings.log_format, settings.log_level)
    redis_url = settings.require_redis_url()
    store = JobStore(connect(redis_url), settings.key_prefix, settings.retention_s)
    warn_if_redis_evicts(store, logging.getLogger("aetrain.worker"))
    if indexed := store.index_states():
        logging.getLogger("aetrain.worker").info("indexed %d stored jobs by state", indexed)
    storage = open_storage(settings.storage_root)
    ray_address = connect_ray(settings.ray_address)
    port = settings.dispatcher_metrics_port
    # Only an exported dispatcher reads the epochs of its jobs from Redis for its metrics.
    metrics = DispatcherMetrics(store if port is not None else None)
    dispatcher = Dispatcher(
        store,
        storage,
        redis_url,
        ray_address,
        lease_ttl_s=settings.lease_ttl_s,
        slots=settings.dispatcher_slots,
        max_takeovers=settings.max_takeovers,
        min_free_disk_bytes=settings.min_free_disk_bytes,
        warm_idle_s=settings.warm_idle_s,
        warm_groups=settings.warm_groups,
        cluster_max=settings.cluster_max,
        group_start_timeout_s=settings.group_start_timeout_s,
        # Resolved here: `auto` on a rank would look at the rank's stderr, never a terminal.
        log_format="json" if is_json(settings.log_format, sys.stderr) else "plain",
        log_level=settings.log_level,
        metrics=metrics,
    )
    if port is not None:
        metrics.serve(port, settings.metrics_host)
        logging.getLogger("aetrain.worker").info(
            "metrics on http://%s:%d/metrics", settings.metrics_host, port
        )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logging.getLogger("aetrain.worker").info("signal %d: stopping", signum)
        dispatcher.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        dispatcher.run_forever()
    finally:
        metrics.close()
        ray.shutdown()

"""The dispatcher: claims jobs from the queue and runs each on Ray; more than one may run."""

import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import ray
import redis
import torch
from threadpoolctl import threadpool_limits

from shared.claims import Claim
from shared.errors import LeaseLost
from shared.jobs import JobRecord, JobState
from shared.logs import LogFormat, log_context
from shared.storage import Storage
from shared.store import DEFAULT_MAX_TAKEOVERS, JobStore
from workers.cluster_limits import ClusterLimits
from workers.faults import pause_at
from workers.group_pool import GroupPool, PoolSettings
from workers.janitor import SWEEP_INTERVAL_S, sweep_logged
from workers.lease import LeaseKeeper
from workers.metrics import DispatcherMetrics
from workers.runner import Stopped, StopReason
from workers.stage_graph import StageFailed, StageGraph, Wiring, cluster_size

log = logging.getLogger("aetrain.dispatcher")


class Dispatcher:
    def __init__(
        self,
        store: JobStore,
        storage: Storage,
        redis_url: str,
        ray_address: str,
        lease_ttl_s: float = 15.0,
        slots: int = 1,
        max_takeovers: int = DEFAULT_MAX_TAKEOVERS,
        min_free_disk_bytes: int = 0,
        dispatcher_id: str | None = None,
        warm_idle_s: float = 60.0,
        warm_groups: int = 0,
        pool: GroupPool | None = None,
        cluster_max: dict[str, float] | None = None,
        group_start_timeout_s: float = 1800.0,
        metrics: DispatcherMetrics | None = None,
        log_format: LogFormat = "auto",
        log_level: str = "INFO",
    ) -> None:
        self.store = store
        self.storage = storage
        self.redis_url = redis_url
        self.ray_address = ray_address
        self.lease_ttl_s = lease_ttl_s
        self.slots = slots
        self.max_takeovers = max_takeovers
        self.min_free_disk_bytes = min_free_disk_bytes
        # AETRAIN_CLUSTER_MAX_* where set, else the autoscaler's maximum (cluster_limits.py)
        self.cluster_limits = ClusterLimits(cluster_max or {})
        self.group_start_timeout_s = group_start_timeout_s
        self.id = dispatcher_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.stopping = threading.Event()
        # A pool passed in is shared (several dispatchers of one process, the tests) and
        # closed by its owner; this dispatcher's own pool goes when it stops.
        self.owns_pool = pool is None
        self.pool = pool or GroupPool(store, self.id, PoolSettings(
            redis_url, ray_address, idle_s=warm_idle_s, keep_warm=warm_groups,
            hold_ttl_s=lease_ttl_s, log_format=log_format, log_level=log_level,
        ))  # fmt: skip
        # The dispatcher evaluates small models beside busy Ray workers; there, torch's
        # default of one thread per core was 2.4x slower with the other core busy and up to
        # 100x slower during a test run on 2 cores (README, "What a job costs").
        torch.set_num_threads(1)
        # numpy's OpenBLAS too: one thread per call, and no BLAS thread pool for a fork to
        # wait on (see workers.processes.parent_death_env).
        threadpool_limits(limits=1)
        self._running: dict[str, threading.Thread] = {}
        self._trained: set[str] = set()  # running jobs past their last stage: finalizing
        self._lock = threading.Lock()
        self._complained_at = -1e9
        self.metrics = metrics or DispatcherMetrics()  # without a store: reads nothing
        self.metrics.bind(lambda: len(self._running), slots, self.pool)

    # -- the loop -------------------------------------------------------------------------------
    def run_forever(self) -> None:
        """Claim and run jobs until `stop()`; running jobs are given back to the queue on stop."""
        log.info("dispatcher %s: %d slot(s), ray at %s", self.id, self.slots, self.ray_address)
        self.pool.start()
        last_register = last_sweep = 0.0
        while not self.stopping.is_set():
            if time.monotonic() - last_register > 2.0:
                self._register()
                self.metrics.sample()  # the epochs of running jobs (with a store: exported)
                last_register = time.monotonic()
            if time.monotonic() - last_sweep > SWEEP_INTERVAL_S:  # leftovers in storage, Redis
                sweep_logged(self.store, self.storage)
                last_sweep = time.monotonic()
            self._reap()
            if len(self._running) >= self.slots:
                time.sleep(0.2)
                continue
            # Without room, only a job whose runner died is taken: it keeps its place in line.
            claim = self._claim(block_ms=500, takeovers_only=not self._cluster_has_room())
            if claim is not None and self.stopping.is_set():  # stopped while it was claimed
                with LeaseKeeper(self.store, claim.job.id, claim.token, self.lease_ttl_s) as lease:
                    self._give_back(claim, lease)
            elif claim is not None:
                thread = threading.Thread(
                    target=self.execute, args=(claim,), name=f"job-{claim.job.id}", daemon=True
                )
                with self._lock:
                    self._running[claim.job.id] = thread
                thread.start()
        for thread in list(self._running.values()):
            thread.join()
        if self.owns_pool:
            self.pool.close()

    def run_once(self, block_ms: int = 1000) -> JobRecord | None:
        """Claim one job and run it to its end in this thread; None when the queue was empty.

        The worker groups of its own pool are let go at the end.
        """
        claim = self._claim(block_ms)
        try:
            return self.execute(claim) if claim is not None else None
        finally:
            if self.owns_pool:
                self.pool.close()

    def stop(self) -> None:
        self.stopping.set()

    def _claim(self, block_ms: int, takeovers_only: bool = False) -> Claim | None:
        try:
            return self.store.claim(self.id, self.lease_ttl_s, block_ms, self.max_takeovers,
                                    takeovers_only, stop=self.stopping.is_set)  # fmt: skip
        except redis.RedisError as exc:  # Redis down: wait and try again, never die
            self._complain(f"cannot claim, Redis is unreachable: {exc}")
            time.sleep(1.0)
            return None
        except Exception:  # a bug, or a record we cannot read: keep serving the others
            log.exception("claim failed; retrying")
            time.sleep(1.0)
            return None

    def _complain(self, message: str) -> None:
        """Log a recurring problem once every few seconds, not on every turn of the loop."""
        now = time.monotonic()
        if now - self._complained_at > 10.0:
            log.warning("%s (repeats are not logged for 10 s)", message)
            self._complained_at = now

    def _cluster_has_room(self) -> bool:
        """Take another job only while a stage could start now; an idle dispatcher always may.

        Jobs left in the queue keep their order (priority, then age) for when room appears,
        rather than sitting claimed behind the running ones.
        """
        if not self._running:
            return True
        try:
            if set(self._running) - self._trained - self.store.scheduler.asking_jobs():
                return False  # a job just claimed has not asked for its resources yet
            used, waiting = self.store.scheduler.reserved()
            size = cluster_size(ray.cluster_resources(), self.cluster_limits.most())
            free_cpus = size.get("CPU", 0.0) - used.get("CPU", 0.0)
            free_cpus += self.pool.idle_cpus()  # held by our idle groups: a job may adopt one
        except Exception as exc:  # Redis or Ray unreachable: claiming would fail too
            self._complain(f"could not read the cluster's free resources: {exc}")
            return False
        return waiting == 0 and free_cpus > 0

    def _reap(self) -> None:
        with self._lock:
            for job_id, thread in list(self._running.items()):
                if not thread.is_alive():
                    del self._running[job_id]

    def _register(self) -> None:
        info = {
            "id": self.id,
            "ray_address": self.ray_address,
            "slots": self.slots,
            "running": len(self._running),
            "idle_groups": self.pool.idle_count(),
            "seen_at": datetime.now(UTC).isoformat(),
        }
        try:
            self.store.dispatchers.register(self.id, info, ttl_s=10.0)
        except redis.RedisError as exc:
            self._complain(f"could not register in Redis: {exc}")

    # -- one job --------------------------------------------------------------------------------
    def execute(self, claim: Claim) -> JobRecord | None:
        """Run a claimed job and record how it ended; None when the lease was lost."""
        job = claim.job
        with log_context(job_id=job.id):  # every line of this thread names the job
            log.info("job %s: attempt %d (token %d)", job.id, job.attempts, claim.token)
            self.metrics.job_claimed(claim)
            lease = LeaseKeeper(self.store, job.id, claim.token, self.lease_ttl_s)
            record = None
            try:
                with lease:
                    record = self._execute(claim, lease)
                return record
            finally:
                self._trained.discard(job.id)
                self.metrics.job_ended(claim, record)

    def _execute(self, claim: Claim, lease: LeaseKeeper) -> JobRecord | None:
        job = claim.job
        wiring = Wiring(self.store, self.storage, self.pool, self.min_free_disk_bytes,
                        self.cluster_limits.most(), self.group_start_timeout_s)  # fmt: skip
        graph = StageGraph(wiring, claim, lease, self.stopping)
        try:
            pause_at("claimed", job.id)
            checkpoints = graph.run()
            self.metrics.stages_trained(job, graph.seconds)
            self._trained.add(job.id)  # its pictures and artifacts need no cluster resources
            pause_at("finalizing", job.id)
            started = time.monotonic()
            result = self._finalize(claim, lease, checkpoints, graph.seconds)
            log.info("job %s: finalized in %.1f s", job.id, time.monotonic() - started)
        except LeaseLost:
            log.warning("job %s: lease lost; another runner owns it now", job.id)
            return None
        except Stopped as stopped:
            if stopped.reason is StopReason.CANCELLED:
                return self._finish(claim, lease, JobState.CANCELLED, error="cancelled by request")
            return self._give_back(claim, lease)
        except StageFailed as exc:
            log.warning("job %s failed: %s", job.id, exc)
            return self._finish(claim, lease, JobState.FAILED, error=str(exc))
        except redis.RedisError as exc:  # retried already (lease.retry): not the job's fault
            log.error("job %s: left to its lease, which lapses; it runs again: %s", job.id, exc)
            return None
        except Exception as exc:
            log.warning("job %s failed: %s", job.id, exc)
            return self._finish(claim, lease, JobState.FAILED,
                                error=f"{type(exc).__name__}: {exc}")  # fmt: skip
        return self._finish(claim, lease, JobState.SUCCEEDED, result=result)

    def _finalize(
        self,
        claim: Claim,
        lease: LeaseKeeper,
        checkpoints: dict[str, str],
        seconds: dict[str, dict[str, float]],
    ) -> dict[str, Any]:
        job_id = claim.job.id
        job = lease.retry(lambda: self.store.get(job_id), "read the record")  # with stage results
        history = lease.retry(lambda: self.store.metrics_history(job_id), "read the metrics")
        relative = self.storage.attempt_folder(job.id, claim.token)
        train_seconds = sum(float(m.get("epoch_seconds", 0.0)) for m in history)
        timings = {
            "train_seconds": train_seconds,
            # From each stage's handover to a group to its first epoch, and to its end: the
            # overhead around the epochs is fit_seconds - train_seconds.
            "start_seconds": sum(s["start"] for s in seconds.values()),
            "fit_seconds": sum(s["fit"] for s in seconds.values()),
        }
        # The artifacts go to this runner's own attempt folder, so a runner that lost its
        # lease never overwrites the new owner's; still, one that froze past its lease (a
        # SIGSTOP, a VM pause) writes nothing on waking. Its lease may lapse while it writes;
        # then the files stay in its folder, which the record never names (the janitor
        # removes it) because `finish` refuses the token.
        if lease.lost.is_set() or not lease.retry(
            lambda: self.store.holds_lease(job_id, claim.token), "check the lease"
        ):
            raise LeaseLost(job_id, claim.token)
        # Imported at the first job's end, not at the start: the artifacts need scikit-learn,
        # matplotlib and the ONNX exporter (~4 CPU-s), which a dispatcher that is stopped or
        # taken over before then never uses.
        from workers.results import finalize

        # On object storage the files are made locally, then stored; the record names the
        # folder only after that, so it never names a folder with files missing.
        with self.storage.writable_folder(relative) as folder:
            result = finalize(job, checkpoints, history, folder, timings,
                              self.storage.datasets_location)  # fmt: skip
        return {**result, "folder": relative}

    def _finish(
        self, claim: Claim, lease: LeaseKeeper, state: JobState, **changes: Any
    ) -> JobRecord | None:
        """Record how the job ended, through Redis errors while the lease is ours.

        Never raises: a job thread that died here left its lease to lapse and a finished job
        to be run again. None when the lease is gone or Redis refused for too long.
        """
        try:
            return lease.retry(lambda: self.store.finish(claim, state, **changes),
                               f"record the job as {state}")  # fmt: skip
        except LeaseLost:
            # (Or a try whose reply was lost with the connection went through and released it.)
            log.warning("job %s: lease lost before it could become %s", claim.job.id, state)
        except redis.RedisError:  # logged by retry; the lease lapses and the job runs again
            pass
        return None

    def _give_back(self, claim: Claim, lease: LeaseKeeper) -> JobRecord | None:
        """Return the job to the queue, through Redis errors while the lease is ours."""
        try:
            return lease.retry(
                lambda: self.store.give_back(
                    claim, "dispatcher stopped; the job goes back to the queue and resumes"
                ),
                "give the job back",
            )
        except LeaseLost:
            log.warning("job %s: lease lost before it could be given back", claim.job.id)
        except redis.RedisError:  # logged by retry; the lease lapses, and a claim takes it over
            pass
        return None

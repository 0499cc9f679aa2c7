"""Keeps a claimed job's lease alive from a background thread, for the whole of its run."""

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

import redis

from shared.errors import LeaseLost
from shared.logs import bind_log_context
from shared.store import JobStore

log = logging.getLogger("aetrain.lease")

T = TypeVar("T")

# How long a runner's write is tried again while Redis refuses it but the lease is still
# renewed (writes refused for memory, renewals are not: PEXPIRE does not add memory). Past
# this the runner gives up, its lease lapses, and the job runs again as after a crash.
WRITE_RETRY_S = 60.0


class LeaseKeeper:
    """Renews the lease every ttl/5 until stopped; `lost` is set once it cannot be renewed.

    A thread, not the run's poll loop, so that slow work between polls (finalizing artifacts
    on a loaded machine) never lets the lease lapse and hands a live job to a second runner.
    """

    def __init__(self, store: JobStore, job_id: str, token: int, ttl_s: float) -> None:
        self.store, self.job_id, self.token, self.ttl_s = store, job_id, token, ttl_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> "LeaseKeeper":
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()

    def retry(self, write: Callable[[], T], what: str, limit_s: float = WRITE_RETRY_S) -> T:
        """`write()`, tried again through Redis errors for as long as the lease may be ours.

        LeaseLost once the lease keeper has given the lease up (a renewal refused, or none for
        a whole TTL) or the store refused the token; the last Redis error once `limit_s` has
        passed. A write whose reply was lost with the connection may have been applied: the
        writes retried here are idempotent, or fail on the retry with LeaseLost (finish and
        give_back release the lease).
        """
        deadline = time.monotonic() + limit_s
        pause, tries = 0.1, 0
        while True:
            try:
                return write()
            except redis.RedisError as exc:
                tries += 1
                if self.lost.is_set():
                    raise LeaseLost(self.job_id, self.token) from exc
                if time.monotonic() + pause > deadline:
                    log.error("job %s: gave up trying to %s after %d tries in %.0f s: %s",
                              self.job_id, what, tries, limit_s, exc)  # fmt: skip
                    raise
                if tries == 1:
                    log.warning("job %s: could not %s; trying again while the lease is ours: "
                                "%s", self.job_id, what, exc)  # fmt: skip
            time.sleep(pause)
            pause = min(2 * pause, 1.0)

    def _run(self) -> None:
        bind_log_context(job_id=self.job_id)  # this thread's lines name the job
        renewed_at = time.monotonic()
        while not self._stop.wait(self.ttl_s / 5):
            try:
                if not self.store.heartbeat(self.job_id, self.token, self.ttl_s):
                    log.warning("job %s: lease %d is gone", self.job_id, self.token)
                    self.lost.set()
                    return
                renewed_at = time.monotonic()
            except Exception as exc:  # Redis unreachable: keep trying until the lease is over
                log.warning("job %s: lease renewal failed: %s", self.job_id, exc)
                if time.monotonic() - renewed_at > self.ttl_s:
                    self.lost.set()
                    return

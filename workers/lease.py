"""Keeps a claimed job's lease alive from a background thread, for the whole of its run."""

import logging
import threading
import time
from types import TracebackType

from shared.store import JobStore

log = logging.getLogger("aetrain.lease")


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

    def _run(self) -> None:
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

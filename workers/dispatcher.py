"""The dispatcher: claims jobs from the queue and runs each on Ray; more than one may run."""

import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import torch

from shared.errors import LeaseLost
from shared.jobs import JobRecord, JobState, StageState
from shared.storage import Storage
from shared.store import Claim, JobStore
from workers.artifacts import final_metrics, load_model, write_artifacts
from workers.data import build_datasets
from workers.lease import LeaseKeeper
from workers.runner import StageRun, Stopped, StopReason, run_stage

log = logging.getLogger("aetrain.dispatcher")

STAGE = "train"


class Dispatcher:
    def __init__(
        self,
        store: JobStore,
        storage: Storage,
        redis_url: str,
        ray_address: str,
        lease_ttl_s: float = 15.0,
        slots: int = 1,
        dispatcher_id: str | None = None,
    ) -> None:
        self.store = store
        self.storage = storage
        self.redis_url = redis_url
        self.ray_address = ray_address
        self.lease_ttl_s = lease_ttl_s
        self.slots = slots
        self.id = dispatcher_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.stopping = threading.Event()
        # The dispatcher only evaluates small models; on this 2-core machine torch's default
        # of one thread per core made that 50-150x slower (bench/overhead.py prints it).
        torch.set_num_threads(1)
        self._running: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    # -- the loop -------------------------------------------------------------------------------
    def run_forever(self) -> None:
        """Claim and run jobs until `stop()`; running jobs are given back to the queue on stop."""
        log.info("dispatcher %s: %d slot(s), ray at %s", self.id, self.slots, self.ray_address)
        last_register = 0.0
        while not self.stopping.is_set():
            if time.monotonic() - last_register > 2.0:
                self._register()
                last_register = time.monotonic()
            self._reap()
            if len(self._running) >= self.slots:
                time.sleep(0.2)
                continue
            claim = self._claim(block_ms=500)
            if claim is not None:
                thread = threading.Thread(
                    target=self.execute, args=(claim,), name=f"job-{claim.job.id}", daemon=True
                )
                with self._lock:
                    self._running[claim.job.id] = thread
                thread.start()
        for thread in list(self._running.values()):
            thread.join()

    def run_once(self, block_ms: int = 1000) -> JobRecord | None:
        """Claim one job and run it to its end in this thread; None when the queue was empty."""
        claim = self._claim(block_ms)
        return self.execute(claim) if claim is not None else None

    def stop(self) -> None:
        self.stopping.set()

    def _claim(self, block_ms: int) -> Claim | None:
        try:
            return self.store.claim(self.id, self.lease_ttl_s, block_ms=block_ms)
        except Exception:  # Redis down: wait and try again, never die
            log.exception("claim failed; retrying")
            time.sleep(1.0)
            return None

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
            "running": sorted(self._running),
            "seen_at": datetime.now(UTC).isoformat(),
        }
        try:
            self.store.register_dispatcher(self.id, info, ttl_s=10.0)
        except Exception:
            log.exception("could not register in Redis")

    # -- one job --------------------------------------------------------------------------------
    def execute(self, claim: Claim) -> JobRecord | None:
        """Run a claimed job and record how it ended; None when the lease was lost."""
        job = claim.job
        log.info("job %s: attempt %d (token %d)", job.id, job.attempts, claim.token)
        lease = LeaseKeeper(self.store, job.id, claim.token, self.lease_ttl_s)
        with lease:
            return self._execute(claim, lease)

    def _execute(self, claim: Claim, lease: LeaseKeeper) -> JobRecord | None:
        job = claim.job
        try:
            if job.stages[0].state is StageState.PENDING:
                self.store.update(
                    job.id, claim.token, lambda j: j.with_stage(STAGE, StageState.RUNNING)
                )
            outcome = run_stage(self.store, self._stage_run(claim), lease, self.stopping.is_set)
            finalize_started = time.monotonic()
            result = self._finalize(claim, outcome)
            seconds = {**outcome["seconds"], "finalize": time.monotonic() - finalize_started}
            log.info("job %s: %s", job.id, ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
        except LeaseLost:
            log.warning("job %s: lease lost; another runner owns it now", job.id)
            return None
        except Stopped as stopped:
            if stopped.reason is StopReason.CANCELLED:
                return self._finish(claim, JobState.CANCELLED, error="cancelled by request")
            return self._give_back(claim)
        except Exception as exc:
            log.warning("job %s failed: %s", job.id, exc)
            return self._finish(claim, JobState.FAILED, error=f"{type(exc).__name__}: {exc}")
        return self._finish(claim, JobState.SUCCEEDED, result=result)

    def _stage_run(self, claim: Claim) -> StageRun:
        job = claim.job
        config: dict[str, Any] = {
            "spec": job.spec.model_dump(mode="json"),
            "job_id": job.id,
            "stage": STAGE,
            "token": claim.token,
            "redis_url": self.redis_url,
            "key_prefix": self.store.prefix,
            "ray_address": self.ray_address,
            "runs_root": str(self.storage.runs_root),
            "run_name": self.storage.run_name(job.id, STAGE),
        }
        logs = self.storage.root / "jobs" / job.id / "logs"
        return StageRun(claim, STAGE, config, logs / f"{STAGE}-attempt-{claim.token}.log")

    def _finalize(self, claim: Claim, outcome: dict[str, Any]) -> dict[str, Any]:
        spec = claim.job.spec
        split = build_datasets(spec.data)
        model = load_model(spec, outcome["checkpoint"])
        metrics: dict[str, Any] = final_metrics(model, spec, split)
        history = self.store.metrics_history(claim.job.id)
        seconds = sum(float(m.get("epoch_seconds", 0.0)) for m in history)
        metrics["train_seconds"] = seconds
        # Start-up of the stage's Ray driver and the whole TorchTrainer.fit(): the overhead
        # around the epochs is fit_seconds - train_seconds.
        metrics["start_seconds"] = outcome["seconds"]["start"]
        metrics["fit_seconds"] = outcome["seconds"]["fit"]
        if seconds > 0:
            metrics["samples_per_s"] = len(split.x_train) * len(history) / seconds
        relative = self.storage.attempt_folder(claim.job.id, claim.token)
        names = write_artifacts(
            self.storage.root / relative, spec, split, model, metrics, history, claim.job.id
        )
        return {"metrics": metrics, "artifacts": names, "folder": relative}

    def _finish(self, claim: Claim, state: JobState, **changes: Any) -> JobRecord | None:
        try:
            return self.store.finish(claim, state, **changes)
        except LeaseLost:
            log.warning("job %s: lease lost before it could become %s", claim.job.id, state)
            return None

    def _give_back(self, claim: Claim) -> JobRecord | None:
        try:
            return self.store.give_back(
                claim, "dispatcher stopped; the job goes back to the queue and resumes"
            )
        except LeaseLost:
            return None

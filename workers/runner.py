"""Runs one stage as a supervised child process and watches lease, cancel and exit."""

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import redis

from shared.claims import Claim
from shared.errors import LeaseLost, TrainingFailed
from shared.store import JobStore
from workers.lease import LeaseKeeper
from workers.processes import parent_death_env

_POLL_S = 0.2
_CANCEL_CHECK_S = 1.0


class StopReason(StrEnum):
    CANCELLED = "cancelled"
    SHUTDOWN = "shutdown"


@dataclass(frozen=True)
class StageRun:
    """What the dispatcher needs to start a stage's child process."""

    claim: Claim
    stage: str
    config: dict[str, Any]
    log_path: Path
    progress_timeout_s: float = 600.0


class Stalled(TrainingFailed):
    """The stage finished no epoch within its progress deadline; its process was killed."""

    def __init__(self, stage: str, seconds: float) -> None:
        super().__init__(f"no epoch finished in {seconds:.0f} s (the progress deadline, "
                         "resources.progress_timeout_s): a rank may be hung")  # fmt: skip
        self.stage, self.seconds = stage, seconds

    def __reduce__(self) -> tuple[type["Stalled"], tuple[str, float]]:
        return (Stalled, (self.stage, self.seconds))


class Diverged(TrainingFailed):
    """The stage's training loss stopped being finite; it ended then, without a retry."""


class Stopped(Exception):
    """The run was stopped on purpose (cancel or shutdown), not by a failure."""

    def __init__(self, reason: StopReason) -> None:
        super().__init__(reason)
        self.reason = reason


def cancel_requested(store: JobStore, job_id: str) -> bool:
    # Redis down for a moment is not a reason to stop training; the lease keeper decides
    # when the job is really lost.
    try:
        return store.get(job_id).cancel_requested
    except redis.RedisError:
        return False


class ProgressWatch:
    """Cancel requests and the progress deadline of one stage, read from its job record.

    Before the run's first epoch the deadline is longer by `startup_s`: starting Ray workers
    and loading data is not a stall.
    """

    def __init__(
        self, store: JobStore, job_id: str, stage: str, deadline_s: float, startup_s: float = 60.0
    ) -> None:
        self.store, self.job_id, self.stage, self.deadline_s = store, job_id, stage, deadline_s
        self.startup_s = startup_s
        self.epoch: int | None = None
        self.seen_progress = False
        self.progress_at = time.monotonic()
        self._first_check = True

    def check(self) -> None:
        """Raise Stopped on a cancel request, Stalled past the deadline without a new epoch."""
        try:
            job = self.store.get(self.job_id)
        except redis.RedisError:  # no news is not a stall: Redis may be back in a moment
            self.progress_at = time.monotonic()
            return
        if job.cancel_requested:
            raise Stopped(StopReason.CANCELLED)
        epoch = job.stage(self.stage).epoch
        if self._first_check:  # an epoch from an earlier run of the stage is not progress
            self.epoch, self._first_check = epoch, False
        elif epoch != self.epoch:
            self.epoch, self.seen_progress, self.progress_at = epoch, True, time.monotonic()
        limit = self.deadline_s + (0.0 if self.seen_progress else self.startup_s)
        if time.monotonic() - self.progress_at > limit:
            raise Stalled(self.stage, time.monotonic() - self.progress_at)


def run_stage(
    store: JobStore,
    run: StageRun,
    lease: LeaseKeeper,
    should_stop: Callable[[], bool],
) -> dict[str, Any]:
    """Run the stage to its end; returns the child's outcome or raises.

    Raises Stopped on cancel or shutdown, LeaseLost when the lease is gone (seen here or by
    the stage's process, which then ends itself), Stalled past the
    progress deadline, Diverged when the loss stopped being finite, TrainingFailed when
    training raised.
    """
    job_id, token = run.claim.job.id, run.claim.token
    workdir = run.log_path.parent
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / f"{run.stage}-attempt-{token}.json"
    outcome_path = workdir / f"{run.stage}-attempt-{token}.outcome.json"
    outcome_path.unlink(missing_ok=True)
    config = {**run.config, "outcome_path": str(outcome_path), "spawned_at": time.time()}
    config_path.write_text(json.dumps(config))
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token"),
           **parent_death_env()}  # fmt: skip
    with open(run.log_path, "ab") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "workers.stage_process", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    watch = ProgressWatch(store, job_id, run.stage, run.progress_timeout_s)
    last_check = time.monotonic()
    try:
        while child.poll() is None:
            time.sleep(_POLL_S)
            if lease.lost.is_set():
                raise LeaseLost(job_id, token)
            if time.monotonic() - last_check >= _CANCEL_CHECK_S:
                watch.check()
                last_check = time.monotonic()
            if should_stop():
                raise Stopped(StopReason.SHUTDOWN)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if not outcome_path.exists():
        raise TrainingFailed(f"training process exited with code {child.returncode}")
    outcome: dict[str, Any] = json.loads(outcome_path.read_text())
    if outcome.get("lease_lost"):  # the process saw it first (stage_process.py): its parent froze
        raise LeaseLost(job_id, token)
    if "diverged_at" in outcome:
        raise Diverged(outcome["error"])
    if "error" in outcome:
        raise TrainingFailed(outcome["error"])
    return outcome

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

from shared.errors import LeaseLost, TrainingFailed
from shared.store import Claim, JobStore
from workers.lease import LeaseKeeper
from workers.processes import die_with_parent

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


class Stopped(Exception):
    """The run was stopped on purpose (cancel or shutdown), not by a failure."""

    def __init__(self, reason: StopReason) -> None:
        super().__init__(reason)
        self.reason = reason


def _cancel_requested(store: JobStore, job_id: str) -> bool:
    # Redis down for a moment is not a reason to stop training; the lease keeper decides
    # when the job is really lost.
    try:
        return store.get(job_id).cancel_requested
    except redis.RedisError:
        return False


def run_stage(
    store: JobStore,
    run: StageRun,
    lease: LeaseKeeper,
    should_stop: Callable[[], bool],
) -> dict[str, Any]:
    """Run the stage to its end; returns the child's outcome or raises.

    Raises Stopped on cancel or shutdown, LeaseLost when the lease is gone, TrainingFailed when
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
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    with open(run.log_path, "ab") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "workers.stage_process", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            preexec_fn=die_with_parent,
        )
    last_cancel_check = time.monotonic()
    try:
        while child.poll() is None:
            time.sleep(_POLL_S)
            if lease.lost.is_set():
                raise LeaseLost(job_id, token)
            now = time.monotonic()
            if now - last_cancel_check >= _CANCEL_CHECK_S:
                if _cancel_requested(store, job_id):
                    raise Stopped(StopReason.CANCELLED)
                last_cancel_check = now
            if should_stop():
                raise Stopped(StopReason.SHUTDOWN)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if not outcome_path.exists():
        raise TrainingFailed(f"training process exited with code {child.returncode}")
    outcome: dict[str, Any] = json.loads(outcome_path.read_text())
    if "error" in outcome:
        raise TrainingFailed(outcome["error"])
    return outcome

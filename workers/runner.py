"""Runs one stage on a warm worker group and watches lease, cancel, progress and the group."""

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis

from shared import locations
from shared.claims import Claim
from shared.errors import LeaseLost, TrainingFailed
from shared.group_channel import StageOutcome
from shared.jobs import JobRecord
from shared.store import JobStore
from workers.group_pool import GroupPool, WarmGroup
from workers.lease import LeaseKeeper

_POLL_S = 0.05
_CANCEL_CHECK_S = 1.0
STOP_GRACE_S = 10.0  # a group that has not stopped its stage by then is killed


class StopReason(StrEnum):
    CANCELLED = "cancelled"
    SHUTDOWN = "shutdown"


@dataclass(frozen=True)
class StageRun:
    """A stage to hand to a group: the claim it runs under and its task's fields."""

    claim: Claim
    stage: str
    task_fields: dict[str, Any]  # StageTask's, but for seq and submitted_at (the group's)
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

    def not_started_yet(self) -> None:
        """Its workers are not up yet (an autoscaling cluster growing): that is no stall."""
        self.progress_at = time.monotonic()

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
    pool: GroupPool,
    group: WarmGroup,
    run: StageRun,
    lease: LeaseKeeper,
    should_stop: Callable[[], bool],
    start_timeout_s: float = 1800.0,
) -> StageOutcome:
    """Train the stage on `group` to its end; returns its outcome or raises.

    Raises Stopped on cancel or shutdown, LeaseLost when the lease is gone (seen here or by
    the group, which then ends the stage itself), Stalled past the progress deadline (the
    group is killed), Diverged when the loss stopped being finite, TrainingFailed when
    training raised or the group died. A group asked to stop that has not within
    STOP_GRACE_S is killed (the pool starts another for the next stage).

    The progress deadline counts from the group's start: a new group may wait long for an
    autoscaling cluster to grow, up to `start_timeout_s`.
    """
    job_id, token = run.claim.job.id, run.claim.token
    task = group.submit(**run.task_fields)
    watch = ProgressWatch(store, job_id, run.stage, run.progress_timeout_s)
    handed_at = last_check = time.monotonic()
    ready = False
    try:
        while (outcome := _read_outcome(group, task.seq)) is None:
            if not group.alive:
                group_log = group.log_tail()
                keep_error_tail(store, lease, run, group_log)
                tail = group_log.strip().splitlines()
                raise TrainingFailed(f"its worker group exited ({group.process.returncode})"
                                     + (f": {tail[-1]}" if tail else ""))  # fmt: skip
            time.sleep(_POLL_S)
            if lease.lost.is_set():
                raise LeaseLost(job_id, token)
            if time.monotonic() - last_check >= _CANCEL_CHECK_S:
                ready = ready or _is_ready(group)
                if not ready:
                    watch.not_started_yet()
                    if time.monotonic() - handed_at > start_timeout_s:
                        pool.retire(group, "it did not start in time")
                        raise TrainingFailed(
                            f"its worker group did not start within {start_timeout_s:.0f} s "
                            "(AETRAIN_GROUP_START_TIMEOUT_S): the cluster has no room for it"
                        )
                watch.check()
                last_check = time.monotonic()
            if should_stop():
                raise Stopped(StopReason.SHUTDOWN)
    except Stalled:
        pool.retire(group, "a stage on it stalled")
        raise
    except (Stopped, LeaseLost):
        _stop(pool, group, task.seq)
        raise
    if outcome.lease_lost:  # the group saw it first: this dispatcher froze past its lease
        raise LeaseLost(job_id, token)
    if outcome.stopped:  # asked by an earlier runner of the job, or this one's stop raced
        raise Stopped(StopReason.SHUTDOWN)
    if outcome.diverged_at is not None:
        raise Diverged(outcome.error or "diverged")
    if outcome.error is not None:
        keep_error_tail(store, lease, run, file_tail(run.task_fields.get("log_path")))
        raise TrainingFailed(outcome.error)
    return outcome


ERROR_TAIL_LINES = 20
ERROR_TAIL_BYTES = 4096


def keep_error_tail(store: JobStore, lease: LeaseKeeper, run: StageRun, log: str) -> None:
    """Put the last lines of the failing stage's log (its traceback) on the job record, as
    `error_tail`: whoever reads the record sees why, without reaching the storage."""
    tail = last_lines(log)
    if not tail:
        return
    job_id, token = run.claim.job.id, run.claim.token

    def change(job: JobRecord) -> JobRecord:
        return job.model_copy(update={"error_tail": tail})

    try:
        lease.retry(lambda: store.update(job_id, token, change), "keep the error's tail")
    except (LeaseLost, redis.RedisError):
        pass  # the failure itself is recorded all the same; its tail only helps to read it


def last_lines(text: str, lines: int = ERROR_TAIL_LINES, max_bytes: int = ERROR_TAIL_BYTES) -> str:
    """The last `lines` lines of `text`, and of those at most the last `max_bytes` (UTF-8)."""
    tail = "\n".join(text.strip().splitlines()[-lines:]).encode()[-max_bytes:]
    return tail.decode(errors="ignore")


def file_tail(path: str | None, limit: int = 2 * ERROR_TAIL_BYTES) -> str:
    """The end of a log (a path or an s3:// location), at most `limit` bytes; "" when there
    is none."""
    if not path:
        return ""
    try:
        return locations.read_range(path, -limit, limit)[0].decode(errors="replace")
    except OSError:
        return ""


def _is_ready(group: WarmGroup) -> bool:
    try:
        return group.channel.is_ready()
    except redis.RedisError:
        return False


def _read_outcome(group: WarmGroup, seq: int) -> StageOutcome | None:
    try:
        return group.channel.outcome(seq)
    except redis.RedisError:  # no news; the lease keeper decides when the job is lost
        return None


def _stop(pool: GroupPool, group: WarmGroup, seq: int) -> None:
    """Ask the group to end the stage; kill it if it has not within STOP_GRACE_S."""
    deadline = time.monotonic() + STOP_GRACE_S
    try:
        group.channel.request_stop(seq)
    except redis.RedisError:
        deadline = 0.0
    while time.monotonic() < deadline and group.alive:
        if _read_outcome(group, seq) is not None:
            return
        time.sleep(_POLL_S)
    pool.retire(group, f"it did not stop its stage within {STOP_GRACE_S:.0f} s")

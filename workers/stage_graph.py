"""Runs the stages of one job as a graph: each stage starts once the stages it needs are done.

A stage is handed to Ray only once the scheduler in Redis has granted its resources, so
stages of this and of other jobs share the cluster without holding part of it while they wait;
independent stages run at the same time when the cluster has room. A stage that asks for more
than the whole cluster has fails at once instead of waiting forever. Stages that succeeded in
an earlier attempt (before a takeover or a restart) are not run again.

Each stage runs on a warm worker group of its shape (group_pool.py): the idle one the stage
before it left, when there is one, so a chain of stages (the layers and fine-tune of a stack,
pretraining then head) trains back to back on one group.
"""

import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import ray
import redis

from shared.claims import Claim
from shared.errors import LeaseLost
from shared.group_channel import GroupShape, StageOutcome
from shared.jobs import JobRecord, StageState
from shared.logs import log_context
from shared.stages import StagePlan, plan_stages
from shared.storage import Storage
from shared.store import JobStore, metrics_cap
from workers.group_pool import GroupPool, WarmGroup
from workers.lease import LeaseKeeper
from workers.runner import (
    Diverged,
    StageRun,
    Stalled,
    Stopped,
    StopReason,
    cancel_requested,
    run_stage,
)

log = logging.getLogger("aetrain.stages")

_WAIT_POLL_S = 0.3


class StageFailed(Exception):
    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(stage, reason)
        self.stage, self.reason = stage, reason

    def __str__(self) -> str:
        return f"stage {self.stage}: {self.reason}"


class StageDiverged(StageFailed):
    """A stage whose training loss stopped being finite; its reason names the stage already."""

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class Wiring:
    """Where a stage finds Redis, storage and the dispatcher's warm groups."""

    store: JobStore
    storage: Storage
    pool: GroupPool
    min_free_disk_bytes: int = 0  # a stage is not started on a storage fuller than this
    # What an autoscaling cluster may grow to (AETRAIN_CLUSTER_MAX_CPUS/GPUS, else the
    # autoscaler's maximum: cluster_limits.py): a stage that fits it is admitted and waits for
    # the nodes; one that does not fails at once.
    cluster_max: dict[str, float] = field(default_factory=dict)
    group_start_timeout_s: float = 1800.0


def cluster_size(up_now: dict[str, float], most: dict[str, float]) -> dict[str, float]:
    """The resources stages are admitted and granted against: what is up, or what the
    cluster may grow to where that is more."""
    size = {kind: float(amount) for kind, amount in up_now.items()}
    for kind, amount in most.items():
        size[kind] = max(size.get(kind, 0.0), amount)
    return size


def fits(need: dict[str, float], room: dict[str, float]) -> bool:
    return all(room.get(kind, 0.0) + 1e-9 >= amount for kind, amount in need.items())


class StageGraph:
    def __init__(
        self, wiring: Wiring, claim: Claim, lease: LeaseKeeper, stopping: threading.Event
    ) -> None:
        self.wiring, self.claim, self.lease = wiring, claim, lease
        self.job_stopping = threading.Event()  # a sibling stage failed
        self.stopping = stopping
        self.seconds: dict[str, dict[str, float]] = {}

    def run(self) -> dict[str, str]:
        """Run every unfinished stage; returns each stage's final checkpoint."""
        job = self.claim.job
        plan = plan_stages(job.spec)
        storage = self.wiring.storage
        # Records keep checkpoints relative to the storage root (a moved storage still works).
        checkpoints = {s.name: storage.locate(s.checkpoint) for s in job.stages
                       if s.state is StageState.SUCCEEDED and s.checkpoint is not None}  # fmt: skip
        pending = [stage for stage in plan if stage.name not in checkpoints]
        total = cluster_size(ray.cluster_resources(), self.wiring.cluster_max)
        for stage in pending:
            need = stage.demand
            if not fits(need, total):
                grows = " may grow to" if self.wiring.cluster_max else " has"
                raise StageFailed(stage.name, f"asks for {need}, more than the whole cluster"
                                  f"{grows} ({_show(total)}); it would wait forever")  # fmt: skip
        running: dict[Future[str], StagePlan] = {}
        with ThreadPoolExecutor(max_workers=len(plan), thread_name_prefix=job.id) as pool:
            try:
                while pending or running:
                    for stage in [s for s in pending if all(n in checkpoints for n in s.needs)]:
                        future = pool.submit(self._run_stage, stage, dict(checkpoints), total)
                        running[future] = stage
                        pending.remove(stage)
                    finished, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                    for future in finished:
                        stage = running.pop(future)
                        checkpoints[stage.name] = future.result()  # raises what the stage raised
            except BaseException:
                self.job_stopping.set()  # stop the siblings; their Stopped is not the news
                raise
        return checkpoints

    def _wait_for_resources(self, stage: StagePlan, total: dict[str, float]) -> str | None:
        """Wait in line until the scheduler grants the stage's resources (no Ray is touched).

        Returns the idle warm group whose hold became the grant, if one did.
        """
        job_id, need = self.claim.job.id, stage.demand
        pool, shape = self.wiring.pool, shape_of(stage)
        last_cancel_check, answer = 0.0, ""
        while True:
            if self.lease.lost.is_set():
                raise LeaseLost(job_id, self.claim.token)
            if self._should_stop():
                raise Stopped(StopReason.SHUTDOWN)
            if time.monotonic() - last_cancel_check >= 1.0:
                if cancel_requested(self.wiring.store, job_id):
                    raise Stopped(StopReason.CANCELLED)
                last_cancel_check = time.monotonic()
            offered = pool.offer(shape)
            try:
                answer = self.wiring.store.scheduler.reserve(self.claim, stage.name, need, total,
                                                             adopt=offered)  # fmt: skip
            except redis.RedisError as exc:
                answer = ""
                log.warning("job %s stage %s: could not ask for resources: %s", job_id,
                            stage.name, exc)  # fmt: skip
            if answer == "granted":
                return offered
            pool.withdraw(offered)
            if answer == "lost":  # frozen past the lease: the stage is someone else's now
                raise LeaseLost(job_id, self.claim.token)
            time.sleep(_WAIT_POLL_S)

    def _mark(self, name: str, state: StageState, **changes: Any) -> JobRecord:
        def change(job: JobRecord) -> JobRecord:
            if job.stage(name).state is state:  # a resumed attempt finds it running already
                return job
            return job.with_stage(name, state, **changes)

        store, job_id, token = self.wiring.store, self.claim.job.id, self.claim.token
        return self.lease.retry(lambda: store.update(job_id, token, change),
                                f"mark stage {name} {state}")  # fmt: skip

    def _should_stop(self) -> bool:
        return self.stopping.is_set() or self.job_stopping.is_set()

    def _run_stage(self, stage: StagePlan, inputs: dict[str, str], total: dict[str, float]) -> str:
        """Wait for resources, train; the resources are held until the stage is marked."""
        with log_context(job_id=self.claim.job.id, stage=stage.name):  # a thread of its own
            return self._run_stage_in_context(stage, inputs, total)

    def _run_stage_in_context(
        self, stage: StagePlan, inputs: dict[str, str], total: dict[str, float]
    ) -> str:
        on = _GroupSlot()
        try:
            adopted = self._wait_for_resources(stage, total)
            self._mark(stage.name, StageState.RUNNING)
            outcome = self._train(stage, inputs, adopted, on)
            assert outcome.checkpoint is not None
            relative = self.wiring.storage.relative_name(outcome.checkpoint)
            self._mark(stage.name, StageState.SUCCEEDED, checkpoint=relative,
                       result=outcome.result)  # fmt: skip
            return outcome.checkpoint
        finally:
            try:
                self.wiring.pool.settle(self.claim, stage.name, on.group)
            except redis.RedisError:  # the lease check frees it once the job's lease is over
                log.exception("job %s stage %s: could not release", self.claim.job.id, stage.name)

    def _run_with_stall_retries(
        self, stage: StagePlan, run: StageRun, adopted: str | None, on: "_GroupSlot"
    ) -> StageOutcome:
        """A stalled run's group is killed and the stage started again on another (it resumes
        from its latest checkpoint), at most `max_failures` times; the group's own restarts
        cover the runs that crash (group_loop.py)."""
        retries = stage.resources.max_failures
        pool = self.wiring.pool
        for attempt in range(retries + 1):
            on.group = pool.take(shape_of(stage), adopted if attempt == 0 else None)
            try:
                return run_stage(self.wiring.store, pool, on.group, run, self.lease,
                                 self._should_stop, self.wiring.group_start_timeout_s)  # fmt: skip
            except Stalled as stalled:
                if attempt == retries:
                    raise
                note = f"{stalled}; restarted from its latest checkpoint ({attempt + 1}/{retries})"
                log.warning("job %s: %s", self.claim.job.id, note)
                self._warn(note)
        raise AssertionError("unreachable")

    def _warn(self, note: str) -> None:
        def change(job: JobRecord) -> JobRecord:
            return job.model_copy(update={"warnings": [*job.warnings, note]})

        # A retry after a reply lost with the connection may repeat the note: harmless.
        store, job_id, token = self.wiring.store, self.claim.job.id, self.claim.token
        self.lease.retry(lambda: store.update(job_id, token, change), "add a warning")

    def _train(
        self, stage: StagePlan, inputs: dict[str, str], adopted: str | None, on: "_GroupSlot"
    ) -> StageOutcome:
        job, wiring = self.claim.job, self.wiring
        free = wiring.storage.free_bytes()
        if free < wiring.min_free_disk_bytes:  # fail now, clearly, not on a half-written checkpoint
            raise StageFailed(stage.name, f"not started: the storage has {free:,} bytes free, "
                              f"below AETRAIN_MIN_FREE_DISK_BYTES ({wiring.min_free_disk_bytes:,})")
        storage = wiring.storage
        log_name = f"{storage.logs_folder(job.id)}/{stage.name}-attempt-{self.claim.token}.log"
        task = {
            "job_id": job.id,
            "token": self.claim.token,
            "stage": stage.name,
            "spec": job.spec.model_dump(mode="json"),
            "inputs": inputs,
            # Locations, not paths: a rank on another node reaches the same files.
            "run_folder": storage.run_location(job.id, stage.name),
            "datasets_root": storage.datasets_location,
            "log_path": storage.location(log_name),
            "metrics_cap": metrics_cap(job),
            "max_failures": stage.resources.max_failures,
        }
        run = StageRun(self.claim, stage.name, task, stage.resources.progress_timeout_s)
        try:
            outcome = self._run_with_stall_retries(stage, run, adopted, on)
        except Stopped as stopped:
            if stopped.reason is StopReason.SHUTDOWN and self.job_stopping.is_set():
                raise StageFailed(stage.name, "stopped: another stage of the job failed") from None
            raise
        except LeaseLost:  # not the stage's failure: the job is another runner's now
            raise
        except Diverged as diverged:
            self._warn(str(diverged))  # the record says why, beside the error
            raise StageDiverged(stage.name, str(diverged)) from None
        except Exception as exc:
            if isinstance(exc, StageFailed):
                raise
            raise StageFailed(stage.name, str(exc)) from exc
        self.seconds[stage.name] = {"start": outcome.start_seconds, "fit": outcome.fit_seconds}
        log.info("job %s stage %s: start %.2f s, fit %.2f s", job.id, stage.name,
                 outcome.start_seconds, outcome.fit_seconds)  # fmt: skip
        return outcome


class _GroupSlot:
    """The group a stage runs on now (a stalled one is replaced), for the stage's settlement."""

    group: WarmGroup | None = None


def shape_of(stage: StagePlan) -> GroupShape:
    r = stage.resources
    return GroupShape(workers=r.workers, cpus_per_worker=r.cpus_per_worker,
                      gpus_per_worker=r.gpus_per_worker)  # fmt: skip


def _show(resources: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()) if k in {"CPU", "GPU"})

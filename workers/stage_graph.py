"""Runs the stages of one job as a graph: each stage starts once the stages it needs are done.

Independent stages run at the same time when the cluster has room; a stage that asks for
more than the whole cluster has fails at once instead of waiting forever. Stages that
succeeded in an earlier attempt (before a takeover or a restart) are not run again.
"""

import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from shared.jobs import JobRecord, StageState
from shared.specs import ResourcesSpec
from shared.stages import StagePlan, plan_stages
from shared.storage import Storage
from shared.store import Claim, JobStore
from workers.checkpoints import load_state
from workers.lease import LeaseKeeper
from workers.runner import StageRun, Stopped, StopReason, run_stage
from workers.tasks import build_task

log = logging.getLogger("aetrain.stages")


class StageFailed(Exception):
    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(stage, reason)
        self.stage, self.reason = stage, reason

    def __str__(self) -> str:
        return f"stage {self.stage}: {self.reason}"


@dataclass(frozen=True)
class Wiring:
    """Where a stage's process finds Redis, Ray and storage."""

    store: JobStore
    storage: Storage
    redis_url: str
    ray_address: str


def demand(resources: ResourcesSpec) -> dict[str, float]:
    need = {"CPU": resources.workers * resources.cpus_per_worker}
    if resources.gpus_per_worker:
        need["GPU"] = resources.workers * resources.gpus_per_worker
    return need


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
        done = {s.name: s.checkpoint for s in job.stages if s.state is StageState.SUCCEEDED}
        checkpoints: dict[str, str] = {k: v for k, v in done.items() if v is not None}
        pending = [stage for stage in plan if stage.name not in checkpoints]
        total = ray.cluster_resources()
        for stage in pending:
            need = demand(stage.resources)
            if not fits(need, total):
                raise StageFailed(stage.name, f"asks for {need}, more than the whole cluster "
                                  f"has ({_show(total)}); it would wait forever")  # fmt: skip
        running: dict[Future[dict[str, Any]], StagePlan] = {}
        with ThreadPoolExecutor(max_workers=len(plan), thread_name_prefix=job.id) as pool:
            try:
                while pending or running:
                    for stage in self._ready(pending, checkpoints, running.values(), total):
                        self._mark(stage.name, StageState.RUNNING)
                        running[pool.submit(self._run_stage, stage, dict(checkpoints))] = stage
                        pending.remove(stage)
                    finished, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                    for future in finished:
                        stage = running.pop(future)
                        outcome = future.result()  # raises what the stage raised
                        checkpoint = checkpoints[stage.name] = outcome["checkpoint"]
                        result = outcome["result"]
                        self._mark(stage.name, StageState.SUCCEEDED,
                                   checkpoint=checkpoint, result=result)  # fmt: skip
            except BaseException:
                self.job_stopping.set()  # stop the siblings; their Stopped is not the news
                raise
        return checkpoints

    def _ready(
        self,
        pending: list[StagePlan],
        checkpoints: dict[str, str],
        running: Any,
        total: dict[str, float],
    ) -> list[StagePlan]:
        """Stages whose inputs exist and that fit beside this job's running stages."""
        room = dict(total)
        for stage in running:
            for kind, amount in demand(stage.resources).items():
                room[kind] = room.get(kind, 0.0) - amount
        ready = []
        for stage in pending:
            need = demand(stage.resources)
            if all(n in checkpoints for n in stage.needs) and fits(need, room):
                ready.append(stage)
                for kind, amount in need.items():
                    room[kind] -= amount
        return ready

    def _mark(self, name: str, state: StageState, **changes: Any) -> JobRecord:
        def change(job: JobRecord) -> JobRecord:
            if job.stage(name).state is state:  # a resumed attempt finds it running already
                return job
            return job.with_stage(name, state, **changes)

        return self.wiring.store.update(self.claim.job.id, self.claim.token, change)

    def _should_stop(self) -> bool:
        return self.stopping.is_set() or self.job_stopping.is_set()

    def _run_stage(self, stage: StagePlan, inputs: dict[str, str]) -> dict[str, Any]:
        job, wiring = self.claim.job, self.wiring
        config: dict[str, Any] = {
            "spec": job.spec.model_dump(mode="json"),
            "job_id": job.id,
            "stage": stage.name,
            "inputs": inputs,
            "token": self.claim.token,
            "redis_url": wiring.redis_url,
            "key_prefix": wiring.store.prefix,
            "ray_address": wiring.ray_address,
            "runs_root": str(wiring.storage.runs_root),
            "run_name": wiring.storage.run_name(job.id, stage.name),
        }
        logs = wiring.storage.root / "jobs" / job.id / "logs"
        run = StageRun(self.claim, stage.name, config,
                       logs / f"{stage.name}-attempt-{self.claim.token}.log")  # fmt: skip
        try:
            outcome = run_stage(wiring.store, run, self.lease, self._should_stop)
        except Stopped as stopped:
            if stopped.reason is StopReason.SHUTDOWN and self.job_stopping.is_set():
                raise StageFailed(stage.name, "stopped: another stage of the job failed") from None
            raise
        except Exception as exc:
            if isinstance(exc, StageFailed):
                raise
            raise StageFailed(stage.name, str(exc)) from exc
        self.seconds[stage.name] = outcome["seconds"]
        started = time.monotonic()
        result = stage_result(job, stage, outcome["checkpoint"], inputs)
        log.info("job %s stage %s: start %.1f s, fit %.1f s, evaluation %.1f s", job.id,
                 stage.name, outcome["seconds"]["start"], outcome["seconds"]["fit"],
                 time.monotonic() - started)  # fmt: skip
        return {"checkpoint": outcome["checkpoint"], "result": result}


def stage_result(
    job: JobRecord, stage: StagePlan, checkpoint: str, inputs: dict[str, str]
) -> dict[str, float]:
    """The final metrics of a finished stage, from its checkpoint."""
    task = build_task(job.spec, stage, inputs)
    task.model.load_state_dict(load_state(Path(checkpoint))["model"])
    task.model.eval()
    with torch.enable_grad():
        return task.final(task.model)


def _show(resources: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()) if k in {"CPU", "GPU"})

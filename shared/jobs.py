"""Job and stage records and their lifecycles: every legal state change is listed here."""

import secrets
import time
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypeAliasType

from shared.errors import InvalidTransition
from shared.metrics import Metrics
from shared.specs import AnyJobSpec, JobSpec
from shared.stages import plan_stages


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class StageState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"


# RUNNING -> QUEUED is a runner giving a job back (shutdown, lost Ray); a takeover after an
# expired lease keeps RUNNING and bumps the fencing token instead.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED}),
    JobState.RUNNING: frozenset(
        {JobState.QUEUED, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}
    ),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}

STAGE_TRANSITIONS: dict[StageState, frozenset[StageState]] = {
    StageState.PENDING: frozenset(
        {StageState.RUNNING, StageState.CANCELLED, StageState.SKIPPED, StageState.FAILED}
    ),
    StageState.RUNNING: frozenset(
        {StageState.PENDING, StageState.SUCCEEDED, StageState.FAILED, StageState.CANCELLED}
    ),
    StageState.SUCCEEDED: frozenset(),
    StageState.FAILED: frozenset(),
    StageState.CANCELLED: frozenset(),
    StageState.SKIPPED: frozenset(),
}


def is_terminal(state: JobState) -> bool:
    return not TRANSITIONS[state]


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_job_id() -> str:
    """A job id that sorts by creation time: `j` + 12 hex digits of ms + 8 random hex digits."""
    return f"j{int(time.time() * 1000):012x}{secrets.token_hex(4)}"


class StageRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    state: StageState = StageState.PENDING
    started_at: datetime | None = None
    finished_at: datetime | None = None
    epoch: int | None = None
    metrics: Metrics = Field(
        default_factory=dict, description="latest metrics; null where one was not finite"
    )
    needs: list[str] = Field(default_factory=list, description="stages that must finish first")
    epochs: int = Field(default=0, description="epochs the stage will train")
    resources: dict[str, float] = Field(
        default_factory=dict, description="what the stage asks of the cluster (CPU, GPU, workers)"
    )
    checkpoint: str | None = Field(
        default=None, description="the stage's final checkpoint, relative to the storage root"
    )
    result: Metrics = Field(
        default_factory=dict, description="final metrics; null where one was not finite"
    )


# Named, so OpenAPI clients get a `ResultSummary`, not a `JobRecordResultType0`.
ResultSummary = TypeAliasType("ResultSummary", dict[str, Any])


class JobRecord(BaseModel):
    """What Redis stores about a job; it changes only through `advance()` and `with_stage()`."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(default_factory=new_job_id)
    kind: str
    name: str
    tenant: str = "default"
    state: JobState = JobState.QUEUED
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    epoch: int | None = Field(default=None, description="latest finished epoch (0-based)")
    metrics: Metrics = Field(
        default_factory=dict, description="latest metrics; null where one was not finite"
    )
    stages: list[StageRecord] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    error: str | None = None
    error_tail: str | None = Field(
        default=None,
        description="the last lines (at most 20, 4 KiB) of the failing stage's log: its traceback",
    )
    attempts: int = Field(default=0, description="how many runs were started (takeovers count)")
    takeovers: int = Field(default=0, description="runs that ended with their runner lost")
    cancel_requested: bool = False
    result: ResultSummary | None = Field(
        default=None, description="final metrics, artifact names and their folder"
    )
    spec: JobSpec

    @classmethod
    def for_spec(cls, spec: AnyJobSpec, tenant: str = "default") -> "JobRecord":
        return cls(
            kind=spec.kind,
            name=spec.name,
            tenant=tenant,
            spec=spec,
            stages=[
                StageRecord(
                    name=stage.name,
                    needs=list(stage.needs),
                    epochs=stage.epochs,
                    resources={"workers": stage.resources.workers, **stage.demand},
                )
                for stage in plan_stages(spec)
            ],
            warnings=spec.warnings(),
        )

    def stage(self, name: str) -> StageRecord:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ValueError(f"job {self.id} has no stage {name!r}")

    def with_stage(self, name: str, to: StageState, **changes: Any) -> "JobRecord":
        """The record with stage `name` moved to state `to` (and `changes` applied to it)."""
        if name not in {stage.name for stage in self.stages}:
            raise ValueError(f"job {self.id} has no stage {name!r}")
        stages = []
        for stage in self.stages:
            if stage.name == name:
                if to not in STAGE_TRANSITIONS[stage.state]:
                    raise InvalidTransition(f"{self.id}/{name}", stage.state, to)
                now = utcnow()
                stage = stage.model_copy(
                    update={
                        "state": to,
                        "started_at": now if to is StageState.RUNNING else stage.started_at,
                        "finished_at": now if not STAGE_TRANSITIONS[to] else None,
                        **changes,
                    }
                )
            stages.append(stage)
        return self.model_copy(update={"stages": stages})


def advance(job: JobRecord, to: JobState, **changes: Any) -> JobRecord:
    """The record moved to state `to`, with timestamps kept right; raises InvalidTransition."""
    if to not in TRANSITIONS[job.state]:
        raise InvalidTransition(job.id, job.state, to)
    now = utcnow()
    update: dict[str, Any] = {"state": to, **changes}
    if to is JobState.RUNNING and job.started_at is None:
        update["started_at"] = now
    if not TRANSITIONS[to]:
        update["finished_at"] = now
        update["stages"] = [
            s if not STAGE_TRANSITIONS[s.state] else _close_stage(s, to, now) for s in job.stages
        ]
    return job.model_copy(update=update)


def _close_stage(stage: StageRecord, job_state: JobState, now: datetime) -> StageRecord:
    final = {
        JobState.SUCCEEDED: StageState.SUCCEEDED,
        JobState.FAILED: StageState.FAILED,
        JobState.CANCELLED: StageState.CANCELLED,
    }[job_state]
    if stage.state is StageState.PENDING:
        final = StageState.SKIPPED
    return stage.model_copy(update={"state": final, "finished_at": now})

"""The shapes of the API's answers, as the client returns them: plain dicts (JSON as sent,
timestamps as ISO 8601 strings) that a type checker knows the keys of.

They mirror shared.jobs.JobRecord, shared.datasets.DatasetInfo and the routes' reply models,
without importing them: a user's program needs neither the server's models nor pydantic's
validation to read an answer, and a field the server adds later does not break it.
"""

from dataclasses import dataclass
from typing import Any, TypedDict

Metrics = dict[str, float | None]  # a finite number, or null where one was not


class Stage(TypedDict):
    name: str
    state: str  # pending, running, succeeded, failed, cancelled, skipped
    started_at: str | None
    finished_at: str | None
    epoch: int | None  # latest finished epoch, 0-based
    epochs: int
    metrics: Metrics
    needs: list[str]
    resources: dict[str, float]
    checkpoint: str | None
    result: Metrics


class Job(TypedDict):
    id: str
    kind: str
    name: str
    tenant: str
    state: str  # queued, running, succeeded, failed, cancelled
    created_at: str
    started_at: str | None
    finished_at: str | None
    epoch: int | None
    metrics: Metrics
    stages: list[Stage]
    warnings: list[str]
    error: str | None
    error_tail: str | None  # the last lines of the failing stage's log (its traceback)
    attempts: int
    takeovers: int
    cancel_requested: bool
    result: dict[str, Any] | None
    spec: dict[str, Any]


class JobPage(TypedDict):
    items: list[Job]
    next_cursor: str | None


class JobResult(TypedDict):
    job_id: str
    metrics: dict[str, Any]
    artifacts: list[str]


class Dataset(TypedDict):
    id: str
    name: str
    shape: list[int]
    dtype: str
    label_counts: dict[str, int] | None
    size_bytes: int
    sha256: str
    created_at: str


class DatasetList(TypedDict):
    items: list[Dataset]
    builtin: list[str]


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event of GET /v1/jobs/{id}/events.

    `kind` is `state` (data: state, error, attempts, stages), `epoch` (data: stage, epoch,
    metrics; `id` resumes the stream after it) or `end` (data: state; the stream closes).
    """

    kind: str
    data: dict[str, Any]
    id: str | None = None

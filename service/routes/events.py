"""GET /v1/jobs/{id}/events: Server-Sent Events of a job, live, until it ends.

Events: `state` (the job's state and every stage's state, sent at the start and on each change),
`epoch` (one per finished epoch of any stage, with its metrics; its SSE id is the position in
the job's metrics stream, so a client that reconnects with Last-Event-ID misses nothing) and
`end` (the job reached a terminal state; the stream closes).
"""

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from service.deps import StoreDep, TenantDep
from shared.jobs import JobRecord, is_terminal
from shared.store import JobStore

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

POLL_S = 0.5
KEEPALIVE_S = 15.0


def _event(kind: str, data: dict[str, Any], event_id: str | None = None) -> str:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data)}\n\n"


def _state(job: JobRecord) -> dict[str, Any]:
    return {
        "state": job.state,
        "error": job.error,
        "attempts": job.attempts,
        "stages": [{"name": s.name, "state": s.state, "epoch": s.epoch} for s in job.stages],
    }


def _state_key(job: JobRecord) -> tuple[Any, ...]:
    return (job.state, job.attempts, tuple(s.state for s in job.stages))


async def job_events(store: JobStore, job: JobRecord, after: str) -> AsyncIterator[str]:
    sent_state: tuple[Any, ...] | None = None
    quiet_s = 0.0
    while True:
        if _state_key(job) != sent_state:
            sent_state = _state_key(job)
            yield _event("state", _state(job))
            quiet_s = 0.0
        # Read after the record: every epoch published before a terminal state is sent.
        while epochs := await run_in_threadpool(store.metrics_after, job.id, after):
            for entry_id, entry in epochs:
                yield _event("epoch", entry, entry_id)
                after, quiet_s = entry_id, 0.0
        if is_terminal(job.state):
            yield _event("end", {"state": job.state})
            return
        quiet_s += POLL_S
        if quiet_s >= KEEPALIVE_S:  # proxies close connections that say nothing for long
            quiet_s = 0.0
            yield ": keepalive\n\n"
        await asyncio.sleep(POLL_S)
        job = await run_in_threadpool(store.get, job.id)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}},
)
def stream_events(
    job_id: str,
    store: StoreDep,
    tenant: TenantDep,
    # Redis refuses a stream id past 64 bits; 19 digits always fit (found by test_fuzz.py).
    last_event_id: Annotated[str | None, Header(pattern=r"^\d{1,19}-\d{1,19}$")] = None,
) -> StreamingResponse:
    """State changes and per-epoch metrics as Server-Sent Events, until the job ends."""
    job = store.get(job_id, tenant)  # 404 before the stream starts
    return StreamingResponse(
        job_events(store, job, last_event_id or "-"),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )

"""GET /v1/jobs/{id}/events: Server-Sent Events of a job, live, until it ends.

Events: `state` (the job's state and every stage's state, sent at the start and on each change),
`epoch` (one per finished epoch of any stage, with its metrics; its SSE id is the position in
the job's metrics stream, so a client that reconnects with Last-Event-ID misses nothing) and
`end` (the job reached a terminal state; the stream closes). A comment line keeps a quiet
stream open through proxies.

A stream sleeps until the process's EventHub wakes it (service/event_hub.py) and reads its job
only then. A tenant has at most `max_event_streams` open (429 past that), and a stream whose API
key is revoked closes within a few seconds.
"""

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from service.deps import CallerDep, StoreDep
from service.event_hub import EventHub, Watch
from shared import apikeys
from shared.apikey_store import Caller
from shared.errors import JobNotFound, Unauthenticated
from shared.jobs import JobRecord, is_terminal
from shared.settings import Settings
from shared.store import JobStore

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

KEEPALIVE_S = 15.0
EPOCH_BATCH = 1000


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


def _read(store: JobStore, job_id: str, after: str) -> tuple[JobRecord, list[tuple[str, Any]]]:
    # The epochs are read after the record: every epoch published before a terminal state is
    # sent before `end`.
    job = store.get(job_id)
    return job, store.metrics_after(job_id, after, count=EPOCH_BATCH)


async def job_events(
    store: JobStore, hub: EventHub, watch: Watch, after: str
) -> AsyncIterator[str]:
    """The events of the watched job from `after` (a metrics entry id, "-": from the start)."""
    try:
        await hub.follow(watch)
        sent_state: tuple[Any, ...] | None = None
        quiet_since = time.monotonic()
        while True:
            watch.changed.clear()  # before the read: a change during it wakes the next wait
            try:
                job, epochs = await run_in_threadpool(_read, store, watch.job_id, after)
            except JobNotFound:  # deleted meanwhile: nothing more will come
                return
            if _state_key(job) != sent_state:
                sent_state = _state_key(job)
                yield _event("state", _state(job))
                quiet_since = time.monotonic()
            while epochs:
                for entry_id, entry in epochs:
                    yield _event("epoch", entry, entry_id)
                    after, quiet_since = entry_id, time.monotonic()
                if len(epochs) < EPOCH_BATCH:
                    break
                epochs = await run_in_threadpool(store.metrics_after, job.id, after, EPOCH_BATCH)
            if is_terminal(job.state):
                yield _event("end", {"state": job.state})
                return
            while not await watch.wait(quiet_since + KEEPALIVE_S - time.monotonic()):
                quiet_since = time.monotonic()
                yield ": keepalive\n\n"  # proxies close connections that say nothing for long
            if watch.revoked:
                return
    finally:
        hub.close(watch)


def _key_row(store: JobStore, request: Request, caller: Caller) -> str | None:
    """The Redis row of the caller's API key, which the hub checks while the stream is open;
    None with auth off, where there is no key."""
    if caller.key_id is None:
        return None
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():  # RequestGuard took this very header
        raise Unauthenticated()
    return store.keys.api_key(apikeys.digest(key.strip()))


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}},
)
async def stream_events(
    job_id: str,
    request: Request,
    store: StoreDep,
    caller: CallerDep,
    # Redis refuses a stream id past 64 bits; 19 digits always fit (found by test_fuzz.py).
    last_event_id: Annotated[str | None, Header(pattern=r"^\d{1,19}-\d{1,19}$")] = None,
) -> StreamingResponse:
    """State changes and per-epoch metrics as Server-Sent Events, until the job ends."""
    # 404 before the stream starts and before it takes a slot
    await run_in_threadpool(store.get, job_id, caller.tenant)
    settings: Settings = request.app.state.settings
    hub: EventHub = request.app.state.event_hub
    api_key = _key_row(store, request, caller)
    watch = await hub.open(job_id, caller.tenant, settings.max_event_streams, api_key)  # or 429
    return StreamingResponse(
        job_events(store, hub, watch, last_event_id or "-"),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )

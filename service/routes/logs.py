"""GET /v1/jobs/{id}/logs: a stage's log, as plain text, from storage; `follow=true` streams it.

Rank 0 of a stage's worker group writes the log (workers/group_loop.py) to
`jobs/<job>/logs/<stage>-attempt-<token>.log` (the name is chosen in workers/stage_graph.py).
A job taken over by another runner runs the stage again under a new fencing token, into a new
file: the newest is served unless `attempt` names another.

What one request may cost is bounded: an answer carries at most `stage_log_max_bytes` (its
headers say where the next page starts), and a follow is an event stream: it takes one of the
tenant's `max_event_streams` slots, holds no thread (it borrows one from the pool for each
read, at most 4 times a second, once a second while the log is quiet), reads its job only
when the event hub says the job changed (or every CHECK_S), and ends once its stage or job has
ended, a newer run of the stage has begun, its key is revoked, it has sent
`stage_log_max_bytes`, or after `stage_log_follow_max_s`. aetrain.Client.logs picks up where a
stream ended.
"""

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

from service.deps import CallerDep, StorageDep, StoreDep
from service.event_hub import EventHub, Watch
from service.routes.events import _key_row
from shared.errors import ArtifactNotFound, JobNotFound
from shared.jobs import STAGE_TRANSITIONS, JobRecord, is_terminal
from shared.locations import read_range
from shared.settings import Settings
from shared.storage import Storage
from shared.store import JobStore

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

# Stage names are ours (shared/stages.py): train, layer2, pretrain-finetune, head, baseline.
STAGE_NAME = r"^[a-z][a-z0-9-]{0,63}$"
_LOG_FILE = re.compile(r"^(?P<stage>[a-z][a-z0-9-]*)-attempt-(?P<token>[0-9]{1,19})\.log$")

# Response headers: which file was read, how big it was, and where the next page starts.
STAGE_HEADER = "X-Log-Stage"
ATTEMPT_HEADER = "X-Log-Attempt"
SIZE_HEADER = "X-Log-Size"
OFFSET_HEADER = "X-Log-Offset"
NEXT_OFFSET_HEADER = "X-Log-Next-Offset"
TRUNCATED_HEADER = "X-Log-Truncated"

READ_CHUNK = 64 * 1024
POLL_S = 0.25  # right after new lines; doubled while the log is quiet, up to QUIET_POLL_S
QUIET_POLL_S = 1.0
CHECK_S = 5.0  # the job is read at least this often, even when the hub says nothing
_MAX_INT = 2**62  # bounds for the OpenAPI document; any offset past a file's end reads nothing


class LogNotFound(ArtifactNotFound):
    """A stage the job does not have, or one that has written no log (yet).

    A kind of ArtifactNotFound (a file of the job that is not there), so that it is a 404
    through that error's row in service/errors.py.
    """

    def __init__(self, job_id: str, what: str) -> None:
        super().__init__(job_id, what)
        self.what = what

    def __str__(self) -> str:
        return f"job {self.job_id!r}: {self.what}"


@dataclass(frozen=True)
class StageLog:
    """One run's log file of one stage."""

    stage: str
    attempt: int  # the fencing token of the run that wrote it
    location: str


def latest_stage(job: JobRecord) -> str | None:
    """The stage that started last; the first stage while none has started."""
    started = [(s.started_at, s.name) for s in job.stages if s.started_at is not None]
    if started:
        return max(started)[1]
    return job.stages[0].name if job.stages else None


def log_files(storage: Storage, job_id: str, stage: str) -> dict[int, str]:
    """The locations of the stage's log files by attempt; only regular files in the store."""
    folder = storage.logs_folder(job_id)
    files = {}
    for entry in storage.entries(folder):
        match = _LOG_FILE.match(entry.name)
        if match and match["stage"] == stage and entry.is_file:
            files[int(match["token"])] = storage.location(f"{folder}/{entry.name}")
    return files


def find_log(storage: Storage, job: JobRecord, stage: str | None, attempt: int | None) -> StageLog:
    """The log of `stage` (default: the latest one) of run `attempt` (default: the newest)."""
    name = stage or latest_stage(job)
    names = [s.name for s in job.stages]
    if name is None:
        raise LogNotFound(job.id, "no stages")
    if name not in names:
        raise LogNotFound(job.id, f"no stage {name!r} (its stages: {', '.join(names)})")
    files = log_files(storage, job.id, name)
    if attempt is None:
        if not files:
            raise LogNotFound(job.id, f"stage {name!r} has no log yet (the job is "
                              f"{job.state}, the stage {job.stage(name).state})")  # fmt: skip
        attempt = max(files)
    elif attempt not in files:
        runs = ", ".join(str(a) for a in sorted(files)) or "none yet"
        raise LogNotFound(job.id, f"stage {name!r} has no log of attempt {attempt} "
                          f"(its attempts: {runs})")  # fmt: skip
    return StageLog(name, attempt, files[attempt])


def _read_more(location: str, offset: int, limit: int) -> bytes | None:
    """What was written past `offset`, at most `limit` bytes; None once the file is gone."""
    try:
        return read_range(location, offset, limit)[0]
    except FileNotFoundError:  # the job was deleted
        return None


def has_ended(store: JobStore, storage: Storage, job_id: str, log: StageLog) -> bool:
    """Whether the run that writes `log` is over: job or stage ended, or a newer run began."""
    try:
        job = store.get(job_id)
    except JobNotFound:
        return True
    if is_terminal(job.state) or not STAGE_TRANSITIONS[job.stage(log.stage).state]:
        return True
    return max(log_files(storage, job_id, log.stage), default=log.attempt) > log.attempt


async def follow_log(
    store: JobStore, storage: Storage, hub: EventHub, watch: Watch, log: StageLog, offset: int,
    budget: int, max_s: float,
) -> AsyncIterator[bytes]:  # fmt: skip
    """The log from `offset` as it grows, until its run is over (then to its last byte), its
    key is revoked, `budget` bytes are sent, or `max_s` has passed."""
    deadline = time.monotonic() + max_s
    try:
        try:
            async with asyncio.timeout(max_s):  # the hub waits for Redis, maybe for long
                await hub.follow(watch)
        except TimeoutError:
            return
        pause, next_check, ending = POLL_S, 0.0, False
        while budget > 0:
            data = await run_in_threadpool(
                _read_more, log.location, offset, min(budget, READ_CHUNK)
            )
            if data is None:
                return
            if data:
                offset, budget, pause = offset + len(data), budget - len(data), POLL_S
                yield data
                continue
            now = time.monotonic()
            if ending or watch.revoked or now >= deadline:
                return
            if watch.changed.is_set() or now >= next_check:
                watch.changed.clear()  # before the read: a change during it wakes the next wait
                next_check = now + CHECK_S
                # One more read once it has ended: the lines written before the record said so.
                ending = await run_in_threadpool(has_ended, store, storage, watch.job_id, log)
                if ending:
                    continue
            await watch.wait(min(pause, deadline - now))
            pause = min(2 * pause, QUIET_POLL_S)
    finally:
        hub.close(watch)


_STAGE_HELP = "a stage of the job; default: the one that started last"
_FOLLOW_HELP = "stream new lines as they are written, until the stage's run ends"
_OFFSET_HELP = "the byte to start at; negative counts from the end (-4096: the last 4 KiB)"
_LIMIT_HELP = "the most bytes to send; never more than AETRAIN_STAGE_LOG_MAX_BYTES"
_ATTEMPT_HELP = f"which run of the stage (an answer's {ATTEMPT_HEADER}); default: the newest"


@router.get(
    "/{job_id}/logs",
    response_class=PlainTextResponse,
    responses={
        200: {
            "description": "the log's bytes (UTF-8 text); the X-Log-* headers say which file, "
            "its size, and the offset of the next page",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
)
async def read_logs(
    job_id: str,
    request: Request,
    store: StoreDep,
    storage: StorageDep,
    caller: CallerDep,
    stage: Annotated[str | None, Query(pattern=STAGE_NAME, description=_STAGE_HELP)] = None,
    follow: Annotated[bool, Query(description=_FOLLOW_HELP)] = False,
    offset: Annotated[int, Query(ge=-_MAX_INT, le=_MAX_INT, description=_OFFSET_HELP)] = 0,
    limit: Annotated[int | None, Query(ge=1, le=_MAX_INT, description=_LIMIT_HELP)] = None,
    attempt: Annotated[int | None, Query(ge=0, le=_MAX_INT, description=_ATTEMPT_HELP)] = None,
) -> Response:
    """A stage's log as plain text; with `follow=true`, a stream of what is written next."""
    job = await run_in_threadpool(store.get, job_id, caller.tenant)  # 404: not the caller's
    log = await run_in_threadpool(find_log, storage, job, stage, attempt)
    settings: Settings = request.app.state.settings
    cap = settings.stage_log_max_bytes
    budget = min(limit or cap, cap)
    headers = {STAGE_HEADER: log.stage, ATTEMPT_HEADER: str(log.attempt),
               "Cache-Control": "no-store"}  # fmt: skip
    try:
        data, start, size = await run_in_threadpool(read_range, log.location, offset,
                                                    0 if follow else budget)  # fmt: skip
    except FileNotFoundError:  # deleted since it was found
        raise LogNotFound(job.id, f"stage {log.stage!r} has no log any more") from None
    if follow:
        hub: EventHub = request.app.state.event_hub
        api_key = _key_row(store, request, caller)
        watch = await hub.open(job.id, caller.tenant, settings.max_event_streams, api_key)
        stream = follow_log(store, storage, hub, watch, log, start, budget,
                            settings.stage_log_follow_max_s)  # fmt: skip
        headers.update({SIZE_HEADER: str(size), OFFSET_HEADER: str(start),
                        "X-Accel-Buffering": "no"})  # fmt: skip
        return StreamingResponse(stream, media_type="text/plain; charset=utf-8", headers=headers)
    end = start + len(data)
    headers.update({SIZE_HEADER: str(size), OFFSET_HEADER: str(start),
                    NEXT_OFFSET_HEADER: str(end)})  # fmt: skip
    if end < size:
        headers[TRUNCATED_HEADER] = (
            f"{size - end} more bytes; at most {budget} bytes an answer (the cap is {cap}, "
            f"AETRAIN_STAGE_LOG_MAX_BYTES): ask again with offset={end}"
        )
    return Response(data, media_type="text/plain; charset=utf-8", headers=headers)

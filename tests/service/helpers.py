"""Service-test helpers: a succeeded job as the dispatcher leaves it, a running one with its
stage logs, and a real HTTP server."""

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from shared import locations
from shared.claims import Claim
from shared.jobs import JobRecord, JobState, StageState
from shared.specs import parse_job_spec
from shared.storage import LocalStorage, Storage
from shared.store import JobStore
from tests.conftest import free_port
from tests.specs import digits_spec

ARTIFACTS = ["encoder.pt", "encoder.safetensors", "model.json", "result.json"]


def artifact_bytes(job_id: str, name: str) -> bytes:
    if name.endswith(".json"):  # served as application/json, so it must be JSON
        return json.dumps({"artifact": name, "job": job_id}).encode()
    return f"artifact {name} of {job_id}".encode()


def succeeded_job(
    store: JobStore,
    storage: Storage,
    tenant: str = "default",
    artifacts: list[str] = ARTIFACTS,
    contents: dict[str, bytes] | None = None,
) -> JobRecord:
    """Submitted, claimed, finished with real files (`contents`, else `artifact_bytes`), on a
    local or an object storage. Call it while nothing else is queued: it claims the head of
    the queue."""
    job, created = store.submit(JobRecord.for_spec(parse_job_spec(digits_spec()), tenant=tenant))
    assert created
    claim = store.claim("test-runner", lease_ttl_s=30.0, block_ms=50)
    assert claim is not None and claim.job.id == job.id
    folder = storage.attempt_folder(job.id, claim.token)
    if isinstance(storage, LocalStorage):
        (storage.root / folder).mkdir(parents=True)
    for name in artifacts:
        data = (contents or {}).get(name) or artifact_bytes(job.id, name)
        locations.write_bytes(storage.location(f"{folder}/{name}"), data)
    result = {"artifacts": artifacts, "folder": folder, "metrics": {"val_mse": 0.01}}
    return store.finish(claim, JobState.SUCCEEDED, result=result)


# -- running jobs and their stage logs ---------------------------------------------------------
def running_job(
    store: JobStore, spec: dict[str, Any] | None = None, tenant: str = "default"
) -> Claim:
    """A job claimed by a test runner, its first stage running. Call it while nothing else is
    queued: it claims the head of the queue."""
    job, _ = store.submit(JobRecord.for_spec(parse_job_spec(spec or digits_spec()), tenant))
    claim = store.claim("test-runner", lease_ttl_s=30.0, block_ms=50)
    assert claim is not None and claim.job.id == job.id
    start_stage(store, claim, job.stages[0].name)
    return claim


def start_stage(store: JobStore, claim: Claim, stage: str) -> None:
    store.update(claim.job.id, claim.token, lambda j: j.with_stage(stage, StageState.RUNNING))


def end_stage(store: JobStore, claim: Claim, stage: str) -> None:
    store.update(claim.job.id, claim.token, lambda j: j.with_stage(stage, StageState.SUCCEEDED))


def log_path(storage: LocalStorage, job_id: str, stage: str, attempt: int) -> Path:
    """Where the workers write a run's log (workers/stage_graph.py, workers/group_loop.py)."""
    return storage.root / "jobs" / job_id / "logs" / f"{stage}-attempt-{attempt}.log"


def write_log(
    storage: LocalStorage, job_id: str, stage: str, attempt: int, text: str | bytes
) -> Path:
    path = log_path(storage, job_id, stage, attempt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def append(path: Path, text: str) -> None:
    with path.open("a") as file:
        file.write(text)


@contextmanager
def serve(app: ASGIApp) -> Iterator[str]:
    """`app` behind a real uvicorn on a free port (in a thread); yields its base URL.

    For requests that an in-process client would rewrite (httpx removes `../` segments)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)

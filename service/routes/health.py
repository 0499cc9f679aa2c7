"""Liveness and readiness: cheap enough for a probe every second, and telling nobody secrets."""

from typing import Any, Literal

import redis
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from service.deps import StoreDep
from service.guards import bearer_token
from shared.store import JobStore

router = APIRouter(tags=["health"])


class Liveness(BaseModel):
    status: Literal["ok"] = "ok"


@router.get("/healthz")
def healthz() -> Liveness:
    """The API process is alive."""
    return Liveness()


@router.get("/readyz", response_model=None)
async def readyz(request: Request, store: StoreDep) -> JSONResponse:
    """Ready when Redis answers and a dispatcher (which holds the Ray connection) is alive.

    Without an API key (auth on) it says only ready or not; with one, how many dispatchers
    and slots there are and whether Redis may evict keys. Never job ids, hosts or addresses.
    """
    try:
        live = await run_in_threadpool(_live_dispatchers, store)
    except redis.RedisError:
        return JSONResponse({"ready": False, "reason": "the job store (Redis) is unreachable"},
                            status_code=503, headers={"Retry-After": "2"})  # fmt: skip
    body: dict[str, Any] = {"ready": bool(live)}
    if not live:
        body["reason"] = "no live dispatcher: start `aetrain worker` (or `aetrain up`)"
    if await run_in_threadpool(_may_see_details, request, store):
        body["dispatchers"] = len(live)
        body["slots"] = sum(int(d.get("slots", 0)) for d in live)
        body["running_jobs"] = sum(int(d.get("running", 0)) for d in live)
        body["redis_eviction_policy"] = await run_in_threadpool(store.eviction_policy)
    return JSONResponse(body, status_code=200 if live else 503)


def _live_dispatchers(store: JobStore) -> list[dict[str, Any]]:
    store.ping()
    return store.dispatchers.live()


def _may_see_details(request: Request, store: JobStore) -> bool:
    if request.app.state.settings.auth == "off":
        return True
    token = bearer_token({k.lower(): v for k, v in request.headers.items()})
    return token is not None and store.api_keys.caller(token) is not None

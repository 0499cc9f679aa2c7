"""Liveness and readiness."""

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.deps import StoreDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The API process is alive."""
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
def readyz(store: StoreDep) -> JSONResponse | dict[str, Any]:
    """Ready when Redis answers and a dispatcher (which holds the Ray connection) is alive."""
    try:
        store.ping()
        dispatchers = store.dispatchers.live()
    except Exception as exc:
        return JSONResponse({"ready": False, "redis": f"unreachable: {exc}"}, status_code=503)
    body = {"ready": bool(dispatchers), "redis": "ok", "dispatchers": dispatchers}
    if not dispatchers:
        body["reason"] = "no live dispatcher: start `aetrain worker` (or `aetrain up`)"
        return JSONResponse(body, status_code=503)
    return body

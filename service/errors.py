"""Errors to HTTP: our domain errors, Redis outages and spec validation errors."""

import logging
import re
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from shared.errors import (
    ArtifactNotFound,
    BodyTooLarge,
    DatasetInUse,
    DatasetInvalid,
    DatasetNotFound,
    ForeignOrigin,
    IdempotencyConflict,
    InvalidTransition,
    JobNotFound,
    QuotaExceeded,
    RateLimited,
    ResultNotReady,
    TooManyJobs,
    TooManyStreams,
    TrainServiceError,
    Unauthenticated,
    UploadTooLarge,
)
from shared.specs import UNION_TAGS

log = logging.getLogger("aetrain.api")

STATUS: dict[type[TrainServiceError], int] = {
    JobNotFound: 404,
    ArtifactNotFound: 404,
    InvalidTransition: 409,
    ResultNotReady: 409,
    IdempotencyConflict: 409,
    Unauthenticated: 401,
    DatasetNotFound: 404,
    DatasetInvalid: 422,
    UploadTooLarge: 413,
    TooManyJobs: 429,
    RateLimited: 429,
    TooManyStreams: 429,
    BodyTooLarge: 413,
    ForeignOrigin: 403,
    QuotaExceeded: 507,
    DatasetInUse: 409,
}

# Seconds a client should wait before trying again, per status.
_RETRY_AFTER = {429: "30", 503: "2"}

# Checks across fields (shared/specs/) start their message with the field they blame.
_NAMED_FIELD = re.compile(r"^Value error, ([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)*): ")

# pydantic puts the tag of a discriminated union member into an error's location.
_TAG_FIELDS = {"'kind'": "kind", "_arch()": "arch", "'type'": "type"}


def field_errors(errors: Any) -> list[dict[str, Any]]:
    """Validation errors with `field` as a dotted path of the spec (`training.epochs`)."""
    out = []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ())]
        if loc and loc[0] in {"body", "query", "header", "path"}:
            where, path = loc[0], loc[1:]
        else:
            where, path = "body", loc
        if where == "body":
            path = [part for part in path if part not in UNION_TAGS]
        if error.get("type") in {"union_tag_invalid", "union_tag_not_found"}:
            discriminator = str(error.get("ctx", {}).get("discriminator", "'kind'"))
            path = [*path, _TAG_FIELDS.get(discriminator, "kind")]
        elif named := _NAMED_FIELD.match(error.get("msg", "")):
            path = [*path, *named.group(1).split(".")]  # a check across fields names its field
        out.append(
            {
                "field": ".".join(path) or where,
                "loc": [where, *path],
                "msg": error.get("msg", "invalid"),
                "type": error.get("type", "value_error"),
            }
        )
    return out


def status_for(exc: TrainServiceError) -> int:
    return next((code for cls, code in STATUS.items() if isinstance(exc, cls)), 400)


def install_error_handlers(app: FastAPI) -> None:
    async def on_domain_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, TrainServiceError)
        status = status_for(exc)
        # RFC 6750: a 401 names the scheme the client should retry with.
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
        if isinstance(exc, RateLimited):
            headers["Retry-After"] = str(exc.retry_after_s)
        elif status in _RETRY_AFTER:
            headers["Retry-After"] = _RETRY_AFTER[status]
        return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)

    async def on_invalid_dataset(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, DatasetInvalid)
        # The same shape as a bad spec's 422: a list naming each bad field (file, x or y).
        detail = [{"field": exc.field, "loc": ["body", exc.field], "msg": exc.reason,
                   "type": "value_error"}]  # fmt: skip
        return JSONResponse({"detail": detail}, status_code=422)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse({"detail": field_errors(exc.errors())}, status_code=422)

    async def on_redis_down(request: Request, exc: Exception) -> JSONResponse:
        return _unavailable(type(exc).__name__)

    async def on_redis_refused(request: Request, exc: Exception) -> JSONResponse:
        # A reply error of a healthy command is a bug of ours (500); one that says Redis
        # cannot take writes now (out of memory, a failed snapshot, a read-only replica,
        # loading) is an outage the client should wait out.
        reason = redis_outage(exc)
        if reason is None:
            log.error("Redis reply error: %s", exc)
            return JSONResponse({"detail": "internal error"}, status_code=500)
        log.warning("Redis refused a command (%s): %s", reason, exc)
        return _unavailable(reason)

    async def on_storage_error(request: Request, exc: Exception) -> JSONResponse:
        # What reaches here is the store failing (S3 unreachable or refusing, a disk gone):
        # absent files are handled where they are looked up, as 404s.
        log.warning("storage error on %s %s: %s", request.method, request.url.path, exc)
        reason = " ".join(str(exc).split())[:300]
        detail = f"the storage is unavailable: {type(exc).__name__}: {reason}"
        return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "5"})

    app.add_exception_handler(TrainServiceError, on_domain_error)
    app.add_exception_handler(OSError, on_storage_error)
    app.add_exception_handler(DatasetInvalid, on_invalid_dataset)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(redis.ConnectionError, on_redis_down)
    app.add_exception_handler(redis.TimeoutError, on_redis_down)
    app.add_exception_handler(redis.ResponseError, on_redis_refused)


# Replies that mean "Redis cannot serve writes right now". redis-py strips the code from the
# message of the errors it has a class for, so those are matched by class.
_REDIS_OUTAGES: dict[type[Exception], str] = {
    redis.exceptions.OutOfMemoryError: "OOM",
    redis.exceptions.ReadOnlyError: "READONLY",
    redis.exceptions.BusyLoadingError: "LOADING",
    redis.exceptions.MasterDownError: "MASTERDOWN",
    redis.exceptions.TryAgainError: "TRYAGAIN",
}
_REDIS_OUTAGE_REPLIES = {"OOM", "MISCONF", "READONLY", "LOADING", "MASTERDOWN", "NOREPLICAS",
                         "TRYAGAIN", "BUSY", "CLUSTERDOWN"}  # fmt: skip


def redis_outage(exc: Exception) -> str | None:
    """The reply code when `exc` says Redis refuses writes for now (OOM, MISCONF, ...)."""
    for cls, code in _REDIS_OUTAGES.items():
        if isinstance(exc, cls):
            return code
    words = str(exc).replace(".", " ").split()
    if isinstance(exc, redis.exceptions.ExecAbortError):  # a MULTI aborted by one of these
        return next((w for w in words if w in _REDIS_OUTAGE_REPLIES), None)
    return words[0] if words and words[0] in _REDIS_OUTAGE_REPLIES else None


def _unavailable(reason: str) -> JSONResponse:
    return JSONResponse(
        {"detail": f"the job store (Redis) is unavailable: {reason}"},
        status_code=503,
        headers={"Retry-After": "2"},
    )

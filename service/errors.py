"""Errors to HTTP: our domain errors, Redis outages and spec validation errors."""

import re
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from shared.errors import (
    ArtifactNotFound,
    DatasetInvalid,
    DatasetNotFound,
    IdempotencyConflict,
    InvalidTransition,
    JobNotFound,
    ResultNotReady,
    TooManyJobs,
    TrainServiceError,
    Unauthenticated,
    UploadTooLarge,
)
from shared.specs import UNION_TAGS

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
}

# Seconds a client should wait before trying again, per status.
_RETRY_AFTER = {429: "30", 503: "2"}

# Checks across fields (shared/specs.py) start their message with the field they blame.
_NAMED_FIELD = re.compile(r"^Value error, ([a-z_]+(?:\.[a-z_]+)*): ")

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


def install_error_handlers(app: FastAPI) -> None:
    async def on_domain_error(request: Request, exc: Exception) -> JSONResponse:
        status = next((code for cls, code in STATUS.items() if isinstance(exc, cls)), 400)
        # RFC 6750: a 401 names the scheme the client should retry with.
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
        if status in _RETRY_AFTER:
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
        return JSONResponse(
            {"detail": f"the job store (Redis) is unavailable: {type(exc).__name__}"},
            status_code=503,
            headers={"Retry-After": "2"},
        )

    app.add_exception_handler(TrainServiceError, on_domain_error)
    app.add_exception_handler(DatasetInvalid, on_invalid_dataset)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(redis.ConnectionError, on_redis_down)
    app.add_exception_handler(redis.TimeoutError, on_redis_down)

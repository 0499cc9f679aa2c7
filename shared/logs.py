"""Log lines of every aetrain process: JSON lines for machines, plain lines for people.

Each line carries the job and the stage it is about, where one applies. They come from
context variables (`log_context`), not from each call's arguments, so a library's log line
(redis, uvicorn, Ray) inside a job's work names the job too. A context variable is per
thread and per asyncio task: a thread started inside a job (a stage's thread) starts with an
empty context and must enter `log_context` itself.

    with log_context(job_id=job.id, stage="train"):
        log.info("started")   # {"ts": ..., "level": "INFO", "logger": ..., "job_id": ...}

Standard library only: the API, the dispatcher and the Ray workers all import it.
"""

import json
import logging
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any, Literal

LogFormat = Literal["auto", "json", "plain"]

_job_id: ContextVar[str | None] = ContextVar("aetrain_job_id", default=None)
_stage: ContextVar[str | None] = ContextVar("aetrain_stage", default=None)

CONTEXT_FIELDS = ("job_id", "stage")

# Everything a LogRecord has of its own; the rest came from `extra=` and goes into the JSON.
_RECORD_FIELDS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


@contextmanager
def log_context(job_id: str | None = None, stage: str | None = None) -> Iterator[None]:
    """Name `job_id` and `stage` on every line logged inside; None keeps what is set already."""
    tokens = []
    if job_id is not None:
        tokens.append((_job_id, _job_id.set(job_id)))
    if stage is not None:
        tokens.append((_stage, _stage.set(stage)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def bind_log_context(job_id: str | None = None, stage: str | None = None) -> None:
    """Name `job_id` and `stage` for the rest of the current context, for work whose context
    ends with it (an asyncio task per request); None keeps what is set already."""
    if job_id is not None:
        _job_id.set(job_id)
    if stage is not None:
        _stage.set(stage)


def current_context() -> dict[str, str]:
    """The job and stage that lines logged here and now are about (only those set)."""
    values = {"job_id": _job_id.get(), "stage": _stage.get()}
    return {name: value for name, value in values.items() if value is not None}


class ContextFilter(logging.Filter):
    """Puts the context's job and stage on each record, unless `extra=` gave them already."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in current_context().items():
            if getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, job_id and stage when known,
    the fields passed as `extra=`, and `exc` (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            if (value := getattr(record, name, None)) is not None:
                entry[name] = value
        for name, value in record.__dict__.items():
            # A leading underscore is a library's own (Ray's record factory adds
            # _ray_timestamp_ns to every record once it is imported), not an `extra=` field.
            if name not in _RECORD_FIELDS and name not in entry and not name.startswith("_"):
                entry[name] = value
        if record.exc_info:
            entry["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        # default=str: an `extra=` value JSON lacks (a Path, a datetime) is written as text
        # rather than losing the line.
        return json.dumps(entry, default=str, ensure_ascii=False)


class PlainFormatter(logging.Formatter):
    """`12:00:00 INFO aetrain.dispatcher [job j01 stage train] message` for a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(context)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f"{label} {value}"
            for label, name in (("job", "job_id"), ("stage", "stage"))
            if (value := getattr(record, name, None)) is not None
        ]
        record.context = f" [{' '.join(parts)}]" if parts else ""  # read by the format
        try:
            return super().format(record)
        finally:  # another handler's formatter must not take it for an `extra=` field
            delattr(record, "context")


def is_json(fmt: LogFormat, stream: IO[str]) -> bool:
    """JSON unless asked for plain, or `auto` and a person watches the stream (a terminal)."""
    if fmt == "auto":
        isatty = getattr(stream, "isatty", None)
        return not (isatty is not None and isatty())
    return fmt == "json"


def configure_logging(
    fmt: LogFormat = "auto", level: int | str = logging.INFO, stream: IO[str] | None = None
) -> logging.Handler:
    """Send every logger's lines to `stream` (stderr) in one format; returns the handler.

    Replaces the root logger's handlers, so calling it twice leaves one handler, and routes
    loggers configured before (their own handlers, no propagation) through it.
    """
    stream = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if is_json(fmt, stream) else PlainFormatter())
    # On the handler, not on a logger: a logger's filters do not see its children's records.
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    # A logger configured before (uvicorn's dictConfig gives uvicorn.access its own handler,
    # no propagation) would bypass this one: every line goes through the root's handler.
    for logger in list(logging.root.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            for old in list(logger.handlers):
                logger.removeHandler(old)
            logger.propagate, logger.disabled = True, False
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler


def configure_own_logging(
    fmt: LogFormat = "auto", level: int | str = logging.INFO, stream: IO[str] | None = None
) -> logging.Handler:
    """Like configure_logging, but for aetrain's loggers (`aetrain.*`) only: in a process
    that another framework set up (a Ray worker), whose own handlers must stay as they are."""
    stream = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if is_json(fmt, stream) else PlainFormatter())
    handler.addFilter(ContextFilter())
    own = logging.getLogger("aetrain")
    for old in list(own.handlers):  # a restarted train function configures it again
        own.removeHandler(old)
        old.close()
    own.addHandler(handler)
    own.propagate = False
    own.setLevel(level.upper() if isinstance(level, str) else level)
    return handler

"""Log lines: one JSON object per line off a terminal, plain on one, with the job and stage
from the context on every line, and never a line lost to a value JSON lacks."""

import io
import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from shared.logs import (
    ContextFilter,
    JsonFormatter,
    PlainFormatter,
    configure_logging,
    configure_own_logging,
    current_context,
    is_json,
    log_context,
)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@contextmanager
def restored(logger: logging.Logger) -> Iterator[None]:
    """The logger's handlers, level and propagation as they were, afterwards."""
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    try:
        yield
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        for handler in handlers:
            logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


@pytest.fixture
def root_handlers() -> Iterator[None]:
    """configure_logging replaces the root logger's handlers: give pytest's back."""
    with restored(logging.getLogger()):
        yield


def record(message: str = "hello %s", *args: Any, **attrs: Any) -> logging.LogRecord:
    made = logging.LogRecord("aetrain.test", logging.WARNING, __file__, 1, message, args or None,
                             None)  # fmt: skip
    for name, value in attrs.items():
        setattr(made, name, value)
    return made


def json_line(made: logging.LogRecord) -> dict[str, Any]:
    ContextFilter().filter(made)
    text = JsonFormatter().format(made)
    assert "\n" not in text
    entry: dict[str, Any] = json.loads(text)
    return entry


def test_a_json_line_has_time_level_logger_and_the_formatted_message() -> None:
    entry = json_line(record("hello %s", "world"))
    assert entry["message"] == "hello world"
    assert entry["level"] == "WARNING" and entry["logger"] == "aetrain.test"
    assert entry["ts"].endswith("+00:00") and "T" in entry["ts"]
    assert "job_id" not in entry and "stage" not in entry


def test_the_context_names_the_job_and_stage_and_is_gone_after_it() -> None:
    with log_context(job_id="j1", stage="train"):
        entry = json_line(record())
        with log_context(stage="layer2"):  # an inner stage keeps the job
            inner = json_line(record())
    assert (entry["job_id"], entry["stage"]) == ("j1", "train")
    assert (inner["job_id"], inner["stage"]) == ("j1", "layer2")
    assert "job_id" not in json_line(record()) and current_context() == {}


def test_extra_fields_are_kept_and_win_over_the_context() -> None:
    with log_context(job_id="j1"):
        entry = json_line(record(job_id="j2", epoch=3, path=Path("/tmp/x")))
    assert entry["job_id"] == "j2" and entry["epoch"] == 3
    assert entry["path"] == "/tmp/x"  # not JSON: written as text rather than losing the line


def test_a_traceback_and_a_multiline_message_stay_on_one_line() -> None:
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        import sys

        made = record("two\nlines")
        made.exc_info = sys.exc_info()
    entry = json_line(made)
    assert entry["message"] == "two\nlines"
    assert entry["exc"].startswith("Traceback") and "ValueError: bad" in entry["exc"]


def test_the_context_is_per_thread() -> None:
    seen: list[dict[str, str]] = []
    with log_context(job_id="j1"):
        thread = threading.Thread(target=lambda: seen.append(current_context()))
        thread.start()
        thread.join()
    assert seen == [{}]  # a thread starts with an empty context: it enters its own


def test_a_plain_line_names_the_job_in_brackets() -> None:
    with log_context(job_id="j1", stage="train"):
        made = record("epoch %d", 3)
        ContextFilter().filter(made)
    text = PlainFormatter().format(made)
    assert text.endswith("WARNING aetrain.test [job j1 stage train] epoch 3")
    assert not hasattr(made, "context")  # nothing left on the record for other handlers
    assert PlainFormatter().format(record("bare")).endswith("WARNING aetrain.test bare")


def test_auto_is_plain_on_a_terminal_and_json_elsewhere() -> None:
    assert not is_json("auto", Terminal()) and is_json("auto", io.StringIO())
    assert is_json("json", Terminal()) and not is_json("plain", io.StringIO())


@pytest.mark.usefixtures("root_handlers")
def test_configure_logging_sends_every_logger_through_one_handler() -> None:
    # As uvicorn's own logging config leaves it when a server ran before in this process:
    # its own handler, no propagation (undone by configure_logging). A server's log_level is
    # its choice and is kept: reset here, as servers of other tests may have set it.
    access = logging.getLogger("uvicorn.access")
    access.addHandler(logging.NullHandler())
    access.propagate = False
    access.setLevel(logging.NOTSET)
    stream = io.StringIO()
    configure_logging("auto", "info", stream)
    configure_logging("auto", "INFO", stream)  # twice: still one handler, one line per call
    assert len(logging.getLogger().handlers) == 1
    with log_context(job_id="j9"):
        logging.getLogger("uvicorn.access").info("GET %s", "/v1/jobs/j9")
    logging.getLogger("aetrain.test").debug("below the level")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) | {"ts": 0} == {
        "ts": 0, "level": "INFO", "logger": "uvicorn.access", "message": "GET /v1/jobs/j9",
        "job_id": "j9",
    }  # fmt: skip


@pytest.mark.usefixtures("root_handlers")
def test_configure_logging_writes_plain_lines_to_a_terminal_unless_told_json() -> None:
    terminal = Terminal()
    configure_logging("auto", "INFO", terminal)
    logging.getLogger("aetrain.test").info("hi")
    assert terminal.getvalue().rstrip().endswith("INFO aetrain.test hi")
    forced = Terminal()
    configure_logging("json", "INFO", forced)
    logging.getLogger("aetrain.test").info("hi")
    assert json.loads(forced.getvalue())["message"] == "hi"


@pytest.fixture
def own_logger() -> Iterator[None]:
    """configure_own_logging changes the `aetrain` logger: as it was, afterwards."""
    with restored(logging.getLogger("aetrain")):
        yield


@pytest.mark.usefixtures("own_logger")
def test_configure_own_logging_names_the_job_on_aetrains_lines_and_leaves_others_alone() -> None:
    # As in a Ray worker: Ray's loggers have handlers of their own, which must stay.
    theirs = logging.getLogger("ray.train.test")
    their_handler = logging.NullHandler()
    theirs.addHandler(their_handler)
    stream = io.StringIO()
    try:
        configure_own_logging("json", "INFO", stream)
        configure_own_logging("json", "INFO", stream)  # a restarted rank: still one handler
        assert len(logging.getLogger("aetrain").handlers) == 1
        with log_context(job_id="j7", stage="layer2"):
            logging.getLogger("aetrain.group").info("rank %d of %d", 0, 2)
            theirs.warning("not ours")
        assert theirs.handlers == [their_handler]
    finally:
        theirs.removeHandler(their_handler)
    (line,) = stream.getvalue().splitlines()
    assert json.loads(line) | {"ts": 0} == {
        "ts": 0, "level": "INFO", "logger": "aetrain.group", "message": "rank 0 of 2",
        "job_id": "j7", "stage": "layer2",
    }  # fmt: skip

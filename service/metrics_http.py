"""Per-request observation: latency by route template, and the job a request is about on its
log lines.

Latency is labelled by the template of the route that served the request (`/v1/jobs/{job_id}`),
never by the raw path, and the method by one of a fixed set: whatever URLs and methods a
client makes up, the label sets stay as many as the routes times the methods times the status
codes. A request no route matched (a 404, or one RequestGuard refused before routing) is
labelled `unmatched`.
"""

import re
import time

from fastapi import Request
from prometheus_client import Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.logs import bind_log_context

UNMATCHED = "unmatched"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# A job id or stage name as aetrain makes them; anything else a client sends in their place
# stays off the log lines (it could carry a newline or a megabyte).
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


def route_template(scope: Scope) -> str:
    """The path template of the route the router chose (set in the scope as it routes)."""
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    return template if isinstance(template, str) and template else UNMATCHED


class RequestMetrics:
    """Plain ASGI (a BaseHTTPMiddleware would buffer event streams): times each request to
    its response's start, so an event stream or a download counts its wait, not its length."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        observed = False

        def observe(status: int) -> None:
            nonlocal observed
            if observed:
                return
            observed = True
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.histogram.labels(method, route_template(scope), str(status)).observe(
                time.perf_counter() - started
            )

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                observe(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        except BaseException:
            observe(500)  # what the server answers for an exception that escaped the app
            raise


async def bind_request_log_context(request: Request) -> None:
    """An app-wide dependency: every line logged while serving the request names its job and
    stage (from the path and `?stage=`).

    Async on purpose: it runs in the request's own task, so the context it sets holds for the
    route and its dependencies (sync ones run in threads that copy the context), where a sync
    dependency would set it in a thread of its own and lose it. The task ends with the request.
    """
    job_id = request.path_params.get("job_id")
    stage = request.query_params.get("stage")
    bind_log_context(
        job_id=job_id if isinstance(job_id, str) and _NAME.match(job_id) else None,
        stage=stage if stage is not None and _NAME.match(stage) else None,
    )

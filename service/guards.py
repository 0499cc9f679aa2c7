"""RequestGuard: what every request must pass before any of its body is read.

1. With auth off (the local `aetrain up`), only requests addressed to a loopback host (or a
   host the operator allowed) and sent from no other site are served: otherwise any web page
   the user visits could reach the API through DNS rebinding or a cross-site `text/plain`
   POST, which needs no CORS preflight.
2. With auth on, a `/v1` request without a live API key gets its 401 before its body is read,
   so an anonymous caller cannot make the API read and parse anything.
3. A JSON body is read here, up to `max_body_bytes` (413 past it, counted as it streams, with
   or without a Content-Length), then handed to the app; dataset uploads stream to disk under
   their own cap instead (service/routes/datasets.py).

It is plain ASGI rather than a FastAPI dependency because FastAPI reads and parses the body
before it resolves dependencies.
"""

import json
from typing import Any
from urllib.parse import urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import status_for
from shared.apikey_store import Caller
from shared.errors import BodyTooLarge, ForeignOrigin, TrainServiceError, Unauthenticated
from shared.settings import Settings
from shared.store import JobStore

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
UPLOAD_PATH = "/v1/datasets"  # streams its body to disk under its own, larger cap


def host_of(value: str) -> str:
    """The host of a Host header or of an Origin URL, lower-case, without port or brackets."""
    if "://" in value:
        return (urlsplit(value).hostname or "").lower()
    if value.startswith("["):  # [::1]:8000
        return value[1:].split("]", 1)[0].lower()
    return value.rsplit(":", 1)[0].lower() if value.count(":") == 1 else value.lower()


def bearer_token(headers: dict[str, str]) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class RequestGuard:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.allowed_hosts = LOOPBACK_HOSTS | settings.extra_allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            if self.settings.auth == "off":
                self._check_origin(headers)
            elif scope["path"].startswith("/v1/") or scope["path"] == "/v1":
                scope.setdefault("state", {})["caller"] = await self._authenticate(scope, headers)
            if scope["method"] in {"POST", "PUT", "PATCH"} and scope["path"] != UPLOAD_PATH:
                receive = await self._buffered_body(headers, receive)
        except TrainServiceError as exc:
            await _reply_error(send, exc)
            return
        await self.app(scope, receive, send)

    def _check_origin(self, headers: dict[str, str]) -> None:
        host = host_of(headers.get("host", ""))
        if host not in self.allowed_hosts:
            raise ForeignOrigin(f"Host {host or '(none)'!r} is not a loopback or allowed host")
        origin = headers.get("origin")
        if origin is not None and host_of(origin) not in self.allowed_hosts:
            raise ForeignOrigin(f"a request from the web page of {origin!r}")
        if headers.get("sec-fetch-site") == "cross-site":
            raise ForeignOrigin("a cross-site request (Sec-Fetch-Site)")

    async def _authenticate(self, scope: Scope, headers: dict[str, str]) -> Caller:
        token = bearer_token(headers)
        if token is None:
            raise Unauthenticated()
        store: JobStore = scope["app"].state.store
        caller = await run_in_threadpool(store.api_keys.caller, token)
        if caller is None:
            raise Unauthenticated()
        return caller

    async def _buffered_body(self, headers: dict[str, str], receive: Receive) -> Receive:
        """Read the whole body, at most `max_body_bytes`; a receive that replays it."""
        limit = self.settings.max_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(limit)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                return _replay([message], receive)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(limit)
            chunks.append(chunk)
            more = message.get("more_body", False)
        return _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}],
                       receive)  # fmt: skip


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay


async def _reply_error(send: Send, exc: TrainServiceError) -> None:
    status = status_for(exc)
    headers: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    body: dict[str, Any] = {"detail": str(exc)}
    payload = json.dumps(body).encode()
    headers.append((b"content-length", str(len(payload)).encode()))
    # The body was not read: the connection cannot be reused for the next request.
    headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})

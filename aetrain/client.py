"""Client: the aetrain HTTP API from Python, one method per thing a user does with a job.

    from aetrain import Client

    client = Client("http://127.0.0.1:8000")        # AETRAIN_URL and AETRAIN_API_KEY by default
    job = client.submit("examples/digits-dense.yaml")
    job = client.wait(job["id"], callback=lambda j: print(j["state"], j["epoch"]))
    encoder = client.load_encoder(job["id"])        # a torch.nn.Module; torch is imported here

Answers are the API's JSON as dicts typed by aetrain.types; a failed call raises the
aetrain.errors class of its status (NotFound, Conflict, RateLimited, ...). The CLI
(service/cli.py) is built on this class.
"""

import codecs
import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Literal, Self, cast, overload
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from aetrain.errors import (
    ApiError,
    ConnectionFailed,
    JobTimeout,
    RateLimited,
    ServiceUnavailable,
    error_for,
)
from aetrain.spec_file import read_spec
from aetrain.types import Dataset, DatasetList, Event, Job, JobPage, JobResult

if TYPE_CHECKING:
    import torch

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
STAGE_TERMINAL = TERMINAL | {"skipped"}
SpecLike = Mapping[str, Any] | str | os.PathLike[str] | BaseModel
FileLike = str | os.PathLike[str] | bytes | IO[bytes]

# The event stream sends a comment every 15 s (service/routes/events.py): a read that waits
# four times that long has lost its server, whatever the client's own timeout is.
_EVENT_READ_TIMEOUT_S = 60.0
# Answers that say "try again soon" rather than "no": `wait` rides them out.
_TRANSIENT = (ConnectionFailed, ServiceUnavailable, RateLimited)
# GET /v1/jobs/{id}/logs: the headers that say which file an answer is from and where it ends.
_LOG_STAGE, _LOG_ATTEMPT, _LOG_OFFSET = "X-Log-Stage", "X-Log-Attempt", "X-Log-Offset"
_LOG_NEXT_OFFSET, _LOG_TRUNCATED = "X-Log-Next-Offset", "X-Log-Truncated"
# The API ends a followed log's stream within AETRAIN_STAGE_LOG_FOLLOW_MAX_S, an hour at most,
# even when nothing is written: a read that waits longer has lost its server.
_LOG_FOLLOW_READ_TIMEOUT_S = 3660.0
_RETRY_S = 2.0  # when the answer does not say how long


def _segment(value: str) -> str:
    """One path segment: a `/` or `..` in an id cannot reach another route."""
    return quote(value, safe="")


class Client:
    """A client of one aetrain API.

    Args:
        url: the API's address; default AETRAIN_URL, else http://127.0.0.1:8000 (`aetrain up`).
        api_key: sent as the bearer token; default AETRAIN_API_KEY (none with auth off).
        timeout: seconds to connect, and to wait for each read of an answer.
        http: an httpx.Client to send the requests with (its base_url is the API's address):
            for your own transport, proxies or certificates, or a FastAPI TestClient in tests.
            The caller closes it.
    """

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        http: httpx.Client | None = None,
    ) -> None:
        if api_key is None:
            api_key = os.environ.get("AETRAIN_API_KEY") or None
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        if http is not None:
            self.url = (url or str(http.base_url)).rstrip("/")
            self._http, self._owns_http = http, False
        else:
            self.url = (url or os.environ.get("AETRAIN_URL") or DEFAULT_URL).rstrip("/")
            self._http = httpx.Client(base_url=self.url, timeout=timeout)
            self._owns_http = True

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- jobs ------------------------------------------------------------------------------------
    def submit(self, spec: SpecLike, *, idempotency_key: str | None = None) -> Job:
        """Validate and enqueue a job: a spec dict, a YAML or JSON file, or a spec model
        (shared.specs.AutoencoderSpec, ...). The same `idempotency_key` again returns the
        first job instead of a second one, so a retried submit is safe."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        response = self._request("POST", "/v1/jobs", json=spec_document(spec), headers=headers)
        return cast(Job, response.json())

    def get(self, job_id: str) -> Job:
        """The job record: state, stages, latest epoch and metrics, error, timestamps, spec."""
        return cast(Job, self._request("GET", f"/v1/jobs/{_segment(job_id)}").json())

    def list(self, state: str | None = None, limit: int = 50, cursor: str | None = None) -> JobPage:
        """One page of the caller's jobs, newest first; pass `next_cursor` as `cursor`."""
        params: dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = state
        if cursor:
            params["cursor"] = cursor
        return cast(JobPage, self._request("GET", "/v1/jobs", params=params).json())

    def jobs(self, state: str | None = None) -> Iterator[Job]:
        """Every job of the caller, newest first, a page at a time."""
        cursor = None
        while True:
            page = self.list(state, limit=200, cursor=cursor)
            yield from page["items"]
            cursor = page["next_cursor"]
            if not cursor:
                return

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job now; a running one stops within seconds (`cancel_requested`)."""
        return cast(Job, self._request("POST", f"/v1/jobs/{_segment(job_id)}/cancel").json())

    def delete(self, job_id: str) -> None:
        """Delete a finished job with its files (the API refuses a queued or running one)."""
        self._request("DELETE", f"/v1/jobs/{_segment(job_id)}")

    def result(self, job_id: str) -> JobResult:
        """Final metrics and artifact names; Conflict until the job has succeeded."""
        return cast(JobResult, self._request("GET", f"/v1/jobs/{_segment(job_id)}/result").json())

    def wait(
        self,
        job_id: str,
        callback: Callable[[Job], object] | None = None,
        timeout: float | None = None,
        *,
        poll_s: float = 1.0,
        on_retry: Callable[[ApiError], object] | None = None,
    ) -> Job:
        """Block until the job is succeeded, failed or cancelled, and return its record.

        `callback(job)` gets the record first and then every time it differs from the last one
        seen (a state, an epoch, metrics), at most once per `poll_s`. An outage (no answer, 503,
        429) is waited out: `on_retry(error)` hears of each. JobTimeout after `timeout` seconds.

        It polls rather than holding an event stream: a poll a second is cheap, survives API
        restarts and proxies, and takes none of the tenant's event streams (see `events`).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        seen: Job | None = None
        while True:
            try:
                job = self.get(job_id)
            except _TRANSIENT as exc:
                if on_retry is not None:
                    on_retry(exc)
                pause = getattr(exc, "retry_after_s", None) or _RETRY_S
            else:
                if job != seen and callback is not None:
                    callback(job)
                seen = job
                if job["state"] in TERMINAL:
                    return job
                pause = poll_s
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise JobTimeout(job_id, seen["state"] if seen else "unknown", timeout or 0)
                pause = min(pause, left)
            time.sleep(pause)

    def events(self, job_id: str, last_event_id: str | None = None) -> Iterator[Event]:
        """The job's Server-Sent Events, live, until it ends: `state` at the start and on each
        change, `epoch` per finished epoch of any stage, then `end`.

        Pass the `id` of the last `epoch` event seen as `last_event_id` to resume a broken
        stream without missing an epoch. A tenant has a few streams open at most (429,
        RateLimited, past it); close a stream you leave early (`.close()` on the iterator).
        """
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        timeout = httpx.Timeout(self.timeout, read=max(self.timeout, _EVENT_READ_TIMEOUT_S))
        with self._stream("GET", f"/v1/jobs/{_segment(job_id)}/events", headers=headers,
                          timeout=timeout) as response:  # fmt: skip
            yield from parse_events(self._lines(response))

    # -- logs ------------------------------------------------------------------------------------
    @overload
    def logs(
        self, job_id: str, stage: str | None = None, follow: Literal[False] = False
    ) -> str: ...

    @overload
    def logs(
        self, job_id: str, stage: str | None = None, *, follow: Literal[True]
    ) -> Iterator[str]: ...

    @overload
    def logs(
        self, job_id: str, stage: str | None = None, follow: bool = False
    ) -> str | Iterator[str]: ...

    def logs(
        self, job_id: str, stage: str | None = None, follow: bool = False
    ) -> str | Iterator[str]:
        """A stage's log (default: the stage that started last) as text; with `follow=True`, an
        iterator of text chunks as they are written, which ends once the stage's run has ended.

        The API sends a log a page at a time (AETRAIN_STAGE_LOG_MAX_BYTES) and ends a follow
        after a while: both are picked up where they stopped. A follow that meets a newer run
        of the stage (the job was taken over) goes on with that run's log. NotFound while the
        stage has not started (or for a stage the job does not have).
        """
        if follow:
            return self._follow_logs(job_id, stage)
        route = f"/v1/jobs/{_segment(job_id)}/logs"
        response = self._request("GET", route, params={"stage": stage} if stage else {})
        pages = [response.content]
        stage, attempt = response.headers[_LOG_STAGE], int(response.headers[_LOG_ATTEMPT])
        pages.extend(self._rest_of_log(route, stage, attempt, response))
        return b"".join(pages).decode(errors="replace")

    def _rest_of_log(
        self, route: str, stage: str, attempt: int, response: httpx.Response
    ) -> Iterator[bytes]:
        """The pages of one log file after `response`, to its end as it is now."""
        while _LOG_TRUNCATED in response.headers:
            params = {"stage": stage, "attempt": attempt,
                      "offset": int(response.headers[_LOG_NEXT_OFFSET])}  # fmt: skip
            response = self._request("GET", route, params=params)
            if not response.content:  # shrunk meanwhile: nothing more to read
                return
            yield response.content

    def _follow_logs(self, job_id: str, stage: str | None) -> Iterator[str]:
        route = f"/v1/jobs/{_segment(job_id)}/logs"
        # The API ends a quiet stream within AETRAIN_STAGE_LOG_FOLLOW_MAX_S (at most an hour).
        timeout = httpx.Timeout(self.timeout, read=max(self.timeout, _LOG_FOLLOW_READ_TIMEOUT_S))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        query: dict[str, Any] = {"stage": stage} if stage else {}
        offset, attempt = 0, None
        while True:
            params = {**query, "follow": "true", "offset": offset}
            if attempt is not None:
                params["attempt"] = attempt
            with self._stream("GET", route, params=params, timeout=timeout) as response:
                query["stage"] = response.headers[_LOG_STAGE]  # the latest stage stays the one
                attempt = int(response.headers[_LOG_ATTEMPT])
                offset = int(response.headers[_LOG_OFFSET])
                for chunk in self._bytes(response):
                    offset += len(chunk)
                    if text := decoder.decode(chunk):
                        yield text
            # The stream ended: at the API's byte cap or time limit, or the run has ended.
            job = self.get(job_id)
            newest = self._request("GET", route, params={**query, "limit": 1})
            newest_attempt = int(newest.headers[_LOG_ATTEMPT])
            if newest_attempt == attempt and not _stage_over(job, query["stage"]):
                continue
            page = self._request("GET", route, params={**query, "attempt": attempt,
                                                       "offset": offset})  # fmt: skip
            for chunk in [page.content, *self._rest_of_log(route, query["stage"], attempt, page)]:
                if text := decoder.decode(chunk):
                    yield text
            if text := decoder.decode(b"", final=True):
                yield text
            if newest_attempt == attempt:
                return
            offset, attempt = 0, newest_attempt  # taken over: the new run's log from its start

    # -- files -----------------------------------------------------------------------------------
    def download(self, job_id: str, name: str, path: str | os.PathLike[str] | None = None) -> Path:
        """Stream one artifact (a name from `result(...)["artifacts"]`) into a file: `path`, a
        file in the folder `path`, or `name` in the working folder. Returns where it went."""
        target = Path(name if path is None else path)
        if target.is_dir():
            target = target / Path(name).name
        route = f"/v1/jobs/{_segment(job_id)}/artifacts/{_segment(name)}"
        return self._save("GET", route, target)

    def download_encoder(
        self, job_id: str, path: str | os.PathLike[str], format: str = "torchscript"
    ) -> Path:
        """Stream the trained encoder into `path` (a file, or a folder to put it in). `format`
        is one the API serves: torchscript (`torch.jit.load`), safetensors weights, or onnx
        (onnxruntime and other runtimes; input `x`, (batch, D) raw features). A job that
        finished before ONNX export was added has no onnx file: NotFound, saying so."""
        target = Path(path)
        if target.is_dir():
            target = target / f"{job_id}-encoder.{'pt' if format == 'torchscript' else format}"
        route = f"/v1/jobs/{_segment(job_id)}/encoder"
        return self._save("GET", route, target, params={"format": format})

    def load_encoder(self, job_id: str, map_location: str | None = "cpu") -> "torch.nn.Module":
        """The job's trained encoder as a ready torch.nn.Module (TorchScript, in eval mode):
        `codes = encoder(x)`, x shaped like the training inputs. Needs torch installed."""
        import torch  # here, not at the top: `import aetrain` stays light without it

        with tempfile.TemporaryDirectory(prefix="aetrain-") as folder:
            path = self.download_encoder(job_id, Path(folder) / "encoder.pt")
            # A ScriptModule, an nn.Module (mypy reads torch as Any: see pyproject.toml).
            module: torch.nn.Module = torch.jit.load(str(path), map_location=map_location)
        return module.eval()

    # -- datasets --------------------------------------------------------------------------------
    def upload(self, file: FileLike, name: str = "", *, multipart: bool = False) -> Dataset:
        """Upload an .npz (x, optional integer labels y) or .npy (x): a path, bytes or an open
        binary file, streamed as the raw body, or as a multipart form with `multipart=True`.
        The same bytes again give the same dataset. Name its `id` as a spec's data.dataset."""
        params = {"name": name} if name else {}
        with _opened(file) as (body, filename):
            if multipart:
                files = {"file": (filename, body, "application/octet-stream")}
                response = self._request("POST", "/v1/datasets", params=params, files=files)
            else:
                headers = {"Content-Type": "application/octet-stream"}
                response = self._request("POST", "/v1/datasets", params=params, content=body,
                                         headers=headers)  # fmt: skip
        return cast(Dataset, response.json())

    def datasets(self) -> DatasetList:
        """The caller's uploads, newest first, and the names of the built-in datasets."""
        return cast(DatasetList, self._request("GET", "/v1/datasets").json())

    def get_dataset(self, dataset_id: str) -> Dataset:
        return cast(Dataset, self._request("GET", f"/v1/datasets/{_segment(dataset_id)}").json())

    def delete_dataset(self, dataset_id: str) -> None:
        """Delete an upload; Conflict while a queued or running job uses it."""
        self._request("DELETE", f"/v1/datasets/{_segment(dataset_id)}")

    # -- HTTP ------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**self._headers, **kwargs.pop("headers", {})}
        try:
            response = self._http.request(method, path, headers=headers, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if response.status_code >= 400:
            raise error_for(response)
        return response

    @contextmanager
    def _stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        headers = {**self._headers, **kwargs.pop("headers", {})}
        try:
            with self._http.stream(method, path, headers=headers, **kwargs) as response:
                if response.status_code >= 400:
                    response.read()
                    raise error_for(response)
                yield response
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: httpx.TransportError) -> ConnectionFailed:
        return ConnectionFailed(
            f"cannot reach the aetrain API at {self.url} ({exc}); is `aetrain up` running?"
        )

    def _bytes(self, response: httpx.Response) -> Iterator[bytes]:
        try:
            yield from response.iter_bytes()
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    def _lines(self, response: httpx.Response) -> Iterator[str]:
        try:
            yield from response.iter_lines()
        except httpx.TransportError as exc:  # the stream broke: resume with last_event_id
            raise self._unreachable(exc) from exc

    def _save(self, method: str, path: str, target: Path, **kwargs: Any) -> Path:
        """The answer's body streamed into `target`, which appears only once it is whole."""
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
        try:
            with self._stream(method, path, **kwargs) as response:
                # Once the API has answered: a nested artifact name (tensorboard/...) needs its
                # folders, and a refused one leaves none behind.
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(partial, "wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return target


def _stage_over(job: Job, stage: str) -> bool:
    """Whether the job has ended, or its stage `stage` has (a stage's run may also end with
    the stage pending again: a runner that gave the job back; then a newer run follows)."""
    states = {s["name"]: s["state"] for s in job["stages"]}
    return job["state"] in TERMINAL or states.get(stage) in STAGE_TERMINAL


def spec_document(spec: SpecLike) -> dict[str, Any]:
    """The JSON document of a spec given as a dict, a YAML or JSON file, or a spec model."""
    if isinstance(spec, BaseModel):
        return spec.model_dump(mode="json")
    if isinstance(spec, str | os.PathLike):
        return read_spec(spec)
    return dict(spec)


def parse_events(lines: Iterator[str]) -> Iterator[Event]:
    """Server-Sent Events from the lines of a `text/event-stream` (the WHATWG rules that the
    API uses: `event`, `data` (joined by newlines), `id`, comments; a blank line ends one)."""
    kind, data, event_id = "message", list[str](), None
    for line in lines:
        if not line:
            if data:
                document = json.loads("\n".join(data))
                payload = document if isinstance(document, dict) else {"data": document}
                yield Event(kind, payload, event_id)
            kind, data, event_id = "message", [], None
            continue
        if line.startswith(":"):  # a keepalive comment
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            kind = value
        elif field == "data":
            data.append(value)
        elif field == "id":
            event_id = value


@contextmanager
def _opened(file: FileLike) -> Iterator[tuple[bytes | IO[bytes], str]]:
    """The upload's body (streamed from an open file) and a file name for a multipart form."""
    if isinstance(file, bytes):
        yield file, "upload"
    elif isinstance(file, str | os.PathLike):
        with open(file, "rb") as f:
            yield f, Path(file).name
    else:
        yield file, Path(str(getattr(file, "name", "upload"))).name

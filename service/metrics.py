"""The API's Prometheus metrics: request latency, and the jobs in Redis read at scrape time.

Job counts are read from the per-state indexes (`jobs:<tenant>:<state>`) and the queues when
Prometheus scrapes, in one pipelined round trip of (states + 1) x tenants commands: the cost
grows with the tenants, never with the jobs, and no API process has to keep counts in step
with the others. What only the dispatcher sees (stage durations, the first epoch, takeovers,
warm groups, samples/s) it exports on its own port (workers/metrics.py).

`GET /metrics` is served on the API's port behind a key when auth is on (only the keys of
AETRAIN_METRICS_TENANT when that is set), or, with AETRAIN_METRICS_PORT, on a port of its own
without a key and not on the API's port at all (docs/observability.md).
"""

import logging
import threading
from collections.abc import Iterable, Iterator
from wsgiref.simple_server import WSGIServer

import redis
from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from service.deps import CallerDep
from shared.errors import Unauthenticated
from shared.jobs import JobState
from shared.settings import Settings
from shared.store import JobStore

log = logging.getLogger("aetrain.metrics")

router = APIRouter(tags=["metrics"])


class JobsCollector(Collector):
    """Jobs by tenant and state, queue depth and live dispatchers, read from Redis per scrape."""

    def __init__(self) -> None:
        self.store: JobStore | None = None  # set by the app's lifespan, which owns Redis

    def describe(self) -> Iterable[Metric]:
        return []  # nothing to check at registration: the families depend on Redis

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("aetrain_redis_up", "whether the job store answered this scrape")
        if self.store is None:
            return
        try:
            families = self._read(self.store)
        except redis.RedisError as exc:  # the API's own metrics still go out
            log.warning("metrics: Redis unreachable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _read(self, store: JobStore) -> list[Metric]:
        keys, states = store.keys, list(JobState)
        tenants = store.tenants()
        pipe = store.redis.pipeline(transaction=False)
        for tenant in tenants:
            for state in states:
                pipe.zcard(keys.state_index(tenant, state))
            pipe.zcard(keys.tenant_queue(tenant))
        pipe.scard(keys.active)
        replies = pipe.execute()
        live = store.dispatchers.live_count()
        jobs = GaugeMetricFamily(
            "aetrain_jobs",
            "jobs by tenant and state (a finished job counts until its record expires)",
            labels=["tenant", "state"],
        )
        queued = GaugeMetricFamily("aetrain_queue_depth", "jobs waiting in a tenant's queue",
                                   labels=["tenant"])  # fmt: skip
        width = len(states) + 1
        for i, tenant in enumerate(tenants):
            row = replies[i * width : (i + 1) * width]
            for state, count in zip(states, row, strict=False):
                jobs.add_metric([tenant, state.value], int(count))
            queued.add_metric([tenant], int(row[-1]))
        active = GaugeMetricFamily("aetrain_jobs_active", "jobs a dispatcher runs now, all tenants")
        active.add_metric([], int(replies[-1]))
        dispatchers = GaugeMetricFamily("aetrain_dispatchers", "live dispatchers")
        dispatchers.add_metric([], live)
        return [jobs, queued, active, dispatchers]


def worker_processes_registry(jobs: Collector) -> CollectorRegistry:
    """What `/metrics` shows when the API runs as several worker processes: the request
    histograms of all of them, summed from their files in PROMETHEUS_MULTIPROC_DIR (whichever
    worker answers the scrape), and the jobs in Redis. No per-process collectors: their
    figures would be those of whichever worker answered."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # untyped in prometheus-client
    registry.register(jobs)
    return registry


class ApiMetrics:
    """One API app's metrics, in a registry of its own (two apps in one process never clash).

    `multiprocess`: one of the worker processes of `aetrain api --workers N` (N > 1), which
    keep their values in files of PROMETHEUS_MULTIPROC_DIR (set by the supervisor); the
    exposition sums them. Said by the caller, not guessed from an inherited variable.
    """

    def __init__(self, multiprocess: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.jobs = JobsCollector()
        self.multiprocess = multiprocess
        if not self.multiprocess:
            for standard in (ProcessCollector, PlatformCollector, GCCollector):
                standard(registry=self.registry)
            self.registry.register(self.jobs)
        self.requests = Histogram(
            "aetrain_http_request_duration_seconds",
            "time to the response's status line, by route template (streams: to their start)",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def exposition(self) -> bytes:
        if self.multiprocess:
            return generate_latest(worker_processes_registry(self.jobs))
        return generate_latest(self.registry)

    def serve(self, port: int, host: str) -> None:
        """Serve the metrics on `host:port` (no key) until `close()`."""
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", host, port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


# The text format 0.0.4, whatever the Accept header asks: every Prometheus reads it, and a
# made-up `version=` in an Accept header cannot reach prometheus-client's parser of it.
@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def get_metrics(request: Request, caller: CallerDep) -> Response:
    """Prometheus metrics of this API process and the jobs in Redis (a key with auth on)."""
    settings: Settings = request.app.state.settings
    if settings.auth == "on" and settings.metrics_tenant not in (None, caller.tenant):
        raise Unauthenticated()  # the same 401 as a bad key: nothing says which keys may read
    metrics: ApiMetrics = request.app.state.metrics
    body = await run_in_threadpool(metrics.exposition)  # Redis reads: off the loop
    return Response(body, media_type=CONTENT_TYPE_PLAIN_0_0_4)

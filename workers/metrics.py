"""A dispatcher's Prometheus metrics: what only the process that runs the jobs sees.

Jobs claimed and how they ended, takeovers, stage durations and start-up times, the time from
a job's submission to its first finished epoch, samples and epochs trained, running jobs, and
warm worker groups busy and idle. Served on AETRAIN_DISPATCHER_METRICS_PORT
(docs/observability.md); the API serves the job counts in Redis.

Epochs are read from each running job's metrics stream in Redis (`metrics:<id>`, one entry
per finished epoch), from where this runner's claim left it, every few seconds and once more
when the job ends: nothing in the training processes has to report to this one. A stream
entry's id is Redis's clock at the epoch's end, so the first epoch's time is exact, not the
time a poll happened to see it.

Imports neither Ray nor torch: the tests build it alone.
"""

import json
import threading
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass, field
from typing import Any, Protocol
from wsgiref.simple_server import WSGIServer

import redis
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.claims import Claim
from shared.jobs import STAGE_TRANSITIONS, JobRecord
from shared.stages import plan_stages
from shared.store import JobStore

# Stages train for seconds (digits, a warm group) to hours.
STAGE_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200)
STARTUP_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
# A job may wait in the queue for a day behind others.
FIRST_EPOCH_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 14400, 86400)
_TAIL_BATCH = 1000


class PoolView(Protocol):
    """What the metrics read of a GroupPool (workers/group_pool.py imports Ray; this does not)."""

    groups: Sized

    def idle_count(self) -> int: ...


def is_takeover(job: JobRecord) -> bool:
    """Whether a claim took the job over from a runner whose lease expired.

    The claim writes no flag for it, only the warning `attempt N: taken over by ...` with N the
    record's new `attempts` (shared/store.py, JobStore._acquire); a claim from the queue adds
    no warning, so the last one names an earlier attempt.
    """
    return bool(job.warnings) and job.warnings[-1].startswith(
        f"attempt {job.attempts}: taken over by "
    )


@dataclass
class _Watch:
    """A running job's metrics stream, as far as this runner has read it."""

    claim: Claim
    cursor: str | None = None  # the last entry read; None until the claim's first read
    fresh: bool = False  # the stream was empty when this runner claimed the job
    kinds: dict[str, str] = field(default_factory=dict)


class _LiveCollector(Collector):
    """Running jobs, slots and warm groups, read from the dispatcher when scraped."""

    def __init__(self) -> None:
        self.running: Callable[[], int] = lambda: 0
        self.slots = 0
        self.pool: PoolView | None = None

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        running = GaugeMetricFamily("aetrain_dispatcher_jobs_running", "jobs this dispatcher runs")
        running.add_metric([], self.running())
        slots = GaugeMetricFamily("aetrain_dispatcher_slots", "jobs this dispatcher may run")
        slots.add_metric([], self.slots)
        yield from (running, slots)
        if self.pool is not None:
            total, idle = len(self.pool.groups), self.pool.idle_count()
            groups = GaugeMetricFamily("aetrain_warm_groups", "this dispatcher's worker groups",
                                       labels=["state"])  # fmt: skip
            groups.add_metric(["busy"], max(0, total - idle))
            groups.add_metric(["idle"], idle)
            yield groups


class DispatcherMetrics:
    """One dispatcher's metrics, in a registry of its own.

    With `store`, the epochs of running jobs are read from Redis by `sample()` and at each
    job's end; without one, nothing here calls Redis (a dispatcher that exports nothing).
    """

    def __init__(self, store: JobStore | None = None) -> None:
        self.store = store
        self.registry = CollectorRegistry()
        for standard in (ProcessCollector, PlatformCollector, GCCollector):
            standard(registry=self.registry)
        self.live = _LiveCollector()
        self.registry.register(self.live)
        r = self.registry
        self.claimed = Counter("aetrain_dispatcher_jobs_claimed", "jobs claimed", registry=r)
        self.takeovers = Counter("aetrain_dispatcher_takeovers",
                                 "jobs taken over from a runner whose lease expired",
                                 registry=r)  # fmt: skip
        self.ended = Counter("aetrain_dispatcher_jobs_ended",
                             "claims ended: the job's state then, or `lost` (lease gone)",
                             ["state"], registry=r)  # fmt: skip
        self.stage_seconds = Histogram(
            "aetrain_stage_duration_seconds", "a stage's run, from running to its end",
            ["kind", "state"], buckets=STAGE_BUCKETS, registry=r,
        )  # fmt: skip
        self.startup_seconds = Histogram(
            "aetrain_stage_startup_seconds",
            "a stage handed to a worker group -> training (group start, data, model, resume)",
            ["kind"], buckets=STARTUP_BUCKETS, registry=r,
        )  # fmt: skip
        self.first_epoch_seconds = Histogram(
            "aetrain_job_first_epoch_seconds", "a job's submission -> its first finished epoch",
            buckets=FIRST_EPOCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.samples = Counter("aetrain_training_samples", "training samples trained (all ranks)",
                               registry=r)  # fmt: skip
        self.epochs = Counter("aetrain_training_epochs", "epochs finished", registry=r)
        self._watches: dict[str, _Watch] = {}
        self._lock = threading.Lock()  # job threads and the dispatcher's loop share the watches
        self._server: WSGIServer | None = None

    # -- wiring ---------------------------------------------------------------------------------
    def bind(self, running: Callable[[], int], slots: int, pool: PoolView | None) -> None:
        """Where the live gauges read the dispatcher's running jobs, slots and warm groups."""
        self.live.running, self.live.slots, self.live.pool = running, slots, pool

    def serve(self, port: int, host: str) -> None:
        """Serve the metrics on `host:port` until `close()`."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- events ---------------------------------------------------------------------------------
    def job_claimed(self, claim: Claim) -> None:
        self.claimed.inc()
        if is_takeover(claim.job):
            self.takeovers.inc()
        kinds = {stage.name: stage.kind for stage in plan_stages(claim.job.spec)}
        with self._lock:
            self._watches[claim.job.id] = _Watch(claim, kinds=kinds)
        self._start_watch(claim.job.id)

    def stages_trained(self, job: JobRecord, seconds: dict[str, dict[str, float]]) -> None:
        """Start-up times of the stages a run trained ({stage: {"start": s, ...}})."""
        kinds = {stage.name: stage.kind for stage in plan_stages(job.spec)}
        for name, timing in seconds.items():
            if "start" in timing:
                self.startup_seconds.labels(kinds.get(name, "unknown")).observe(timing["start"])

    def job_ended(self, claim: Claim, record: JobRecord | None) -> None:
        """The claim is over: `record` is how it left the job, None when its lease was lost."""
        self.sample(only=claim.job.id)  # the epochs since the last sample
        with self._lock:
            watch = self._watches.pop(claim.job.id, None)
        self.ended.labels(record.state.value if record is not None else "lost").inc()
        if record is None:
            return
        kinds = watch.kinds if watch is not None else {}
        for stage in record.stages:
            before = claim.job.stage(stage.name) if stage.name in kinds else None
            if before is not None and not STAGE_TRANSITIONS[before.state]:
                continue  # ended in an earlier run: counted there
            if stage.started_at is None or stage.finished_at is None:
                continue  # skipped, never ran
            seconds = (stage.finished_at - stage.started_at).total_seconds()
            self.stage_seconds.labels(kinds.get(stage.name, "unknown"), stage.state.value
                                      ).observe(max(0.0, seconds))  # fmt: skip

    # -- reading the epochs ---------------------------------------------------------------------
    def _start_watch(self, job_id: str) -> None:
        """Note where the job's metrics stream ends at the claim: later entries are this run's."""
        if self.store is None:
            return
        try:
            last = self.store.redis.xrevrange(self.store.keys.metrics(job_id), "+", "-", count=1)
        except redis.RedisError:  # this run's epochs go uncounted; the job is not hurt
            return
        with self._lock:
            watch = self._watches.get(job_id)
            if watch is not None:
                watch.cursor = last[0][0] if last else "0-0"
                watch.fresh = not last

    def sample(self, only: str | None = None) -> None:
        """Count the epochs finished since the last sample (of one job, or of all running)."""
        if self.store is None:
            return
        with self._lock:
            watches = [w for job_id, w in self._watches.items()
                       if (only is None or job_id == only) and w.cursor is not None]  # fmt: skip
        if not watches:
            return
        pipe = self.store.redis.pipeline(transaction=False)
        for watch in watches:
            pipe.xrange(self.store.keys.metrics(watch.claim.job.id), f"({watch.cursor}", "+",
                        count=_TAIL_BATCH)  # fmt: skip
        try:
            replies = pipe.execute()
        except redis.RedisError:  # the next sample reads on from the same entries
            return
        for watch, entries in zip(watches, replies, strict=True):
            self._count(watch, entries)

    def _count(self, watch: _Watch, entries: list[tuple[str, dict[str, str]]]) -> None:
        claim = watch.claim
        for entry_id, fields in entries:
            with self._lock:
                if watch.cursor is None or _after(watch.cursor, entry_id):
                    continue  # counted by a sample that ran at the same time
                watch.cursor = entry_id
                first, watch.fresh = watch.fresh, False
            if fields.get("token") != str(claim.token):
                continue  # not this run's (fenced writes make this rare)
            if first:
                # Redis's clock (the entry id) against the API's (created_at): hosts in sync.
                epoch_at = int(entry_id.split("-")[0]) / 1000
                waited = epoch_at - claim.job.created_at.timestamp()
                self.first_epoch_seconds.observe(max(0.0, waited))
            self.epochs.inc()
            metrics: dict[str, Any] = json.loads(fields.get("metrics", "{}"),
                                                 parse_constant=lambda _: None)  # fmt: skip
            rate, seconds = metrics.get("samples_per_s"), metrics.get("epoch_seconds")
            if isinstance(rate, int | float) and isinstance(seconds, int | float):
                self.samples.inc(max(0.0, rate * seconds))  # = the train split (all ranks)


def _after(cursor: str, entry_id: str) -> bool:
    """Whether stream entry `cursor` comes after (or is) `entry_id`."""
    a, b = cursor.split("-"), entry_id.split("-")
    return (int(a[0]), int(a[1])) >= (int(b[0]), int(b[1]))

"""JobStore: Redis as the system of record, and the only module that knows Redis keys.

Jobs are JSON records; the queue is a Stream read by one consumer group, so a job is delivered
at least once. A runner holds a lease (`lease:{id}`, a fencing token with a TTL) that it renews
by heartbeat; only an expired lease lets another runner take the job over, and every write of
a runner is checked against its token, so a stale runner's writes are refused.
"""

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from shared.errors import IdempotencyConflict, InvalidTransition, JobNotFound, LeaseLost
from shared.jobs import JobRecord, JobState, advance, is_terminal

GROUP = "dispatchers"
IDEMPOTENCY_TTL_S = 24 * 3600
_MAX_WATCH_RETRIES = 50

# KEYS: lease. ARGV: token, ttl_ms. Renew only the lease we hold.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lease, progress, metrics stream. ARGV: token, stage, epoch, metrics json.
# The progress hash has one field per stage ({"epoch", "metrics"}) and `_latest`, the stage
# that reported last.
_PROGRESS = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local entry = '{"epoch": ' .. ARGV[3] .. ', "metrics": ' .. ARGV[4] .. '}'
redis.call('HSET', KEYS[2], ARGV[2], entry, '_latest', ARGV[2])
redis.call('XADD', KEYS[3], '*', 'stage', ARGV[2], 'epoch', ARGV[3], 'metrics', ARGV[4],
           'token', ARGV[1])
return 1
"""


@dataclass(frozen=True)
class Claim:
    """A job this runner now holds: its record, fencing token and queue message."""

    job: JobRecord
    token: int
    message_id: str


def connect(url: str) -> redis.Redis:
    """A Redis client that fails fast when Redis is down instead of hanging."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=5,
        socket_connect_timeout=2,
        health_check_interval=10,
    )


def spec_digest(spec_json: str) -> str:
    return hashlib.sha256(spec_json.encode()).hexdigest()


class JobStore:
    def __init__(self, client: redis.Redis, prefix: str = "aetrain") -> None:
        # redis-py's stubs type every reply as a sync/async union; Any keeps the calls readable.
        self.redis: Any = client
        self.prefix = prefix
        self._renew = client.register_script(_RENEW)
        self._progress = client.register_script(_PROGRESS)

    # -- keys ---------------------------------------------------------------------------------
    def _job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def _lease_key(self, job_id: str) -> str:
        return f"{self.prefix}:lease:{job_id}"

    def _fence_key(self, job_id: str) -> str:
        return f"{self.prefix}:fence:{job_id}"

    def _progress_key(self, job_id: str) -> str:
        return f"{self.prefix}:progress:{job_id}"

    def _metrics_key(self, job_id: str) -> str:
        return f"{self.prefix}:metrics:{job_id}"

    def _index_key(self, tenant: str) -> str:
        return f"{self.prefix}:jobs:{tenant}"

    def _idempotency_key(self, tenant: str, key: str) -> str:
        return f"{self.prefix}:idem:{tenant}:{hashlib.sha256(key.encode()).hexdigest()}"

    def _dispatcher_key(self, dispatcher_id: str) -> str:
        return f"{self.prefix}:dispatcher:{dispatcher_id}"

    @property
    def queue_key(self) -> str:
        return f"{self.prefix}:queue"

    # -- submission and reads -----------------------------------------------------------------
    def ping(self) -> bool:
        return bool(self.redis.ping())

    def ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(self.queue_key, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def submit(self, job: JobRecord, idempotency_key: str | None = None) -> tuple[JobRecord, bool]:
        """Store and enqueue a job in one transaction; returns (record, created).

        With an idempotency key seen before for the same spec, returns the first job instead.
        """
        spec_json = job.spec.model_dump_json()
        idem_key = self._idempotency_key(job.tenant, idempotency_key) if idempotency_key else None
        with self.redis.pipeline() as pipe:
            for _ in range(_MAX_WATCH_RETRIES):
                try:
                    if idem_key:
                        pipe.watch(idem_key)
                        seen = pipe.get(idem_key)
                        if seen is not None:
                            pipe.reset()
                            first = json.loads(seen)
                            if first["digest"] != spec_digest(spec_json):
                                raise IdempotencyConflict(idempotency_key or "")
                            return self.get(first["job_id"], tenant=job.tenant), False
                    pipe.multi()
                    pipe.set(self._job_key(job.id), job.model_dump_json())
                    pipe.zadd(self._index_key(job.tenant), {job.id: 0})
                    pipe.xadd(self.queue_key, {"job_id": job.id})
                    if idem_key:
                        entry = {"job_id": job.id, "digest": spec_digest(spec_json)}
                        pipe.set(idem_key, json.dumps(entry), ex=IDEMPOTENCY_TTL_S)
                    pipe.execute()
                    return job, True
                except redis.WatchError:
                    continue
        raise RuntimeError("submit: too much contention on the idempotency key")

    def _load(self, job_id: str, client: Any = None) -> JobRecord:
        raw = (client or self.redis).get(self._job_key(job_id))
        if raw is None:
            raise JobNotFound(job_id)
        return JobRecord.model_validate_json(raw)

    def get(self, job_id: str, tenant: str | None = None) -> JobRecord:
        """The job record with its live progress; another tenant's job is JobNotFound."""
        job = self._load(job_id)
        if tenant is not None and job.tenant != tenant:
            raise JobNotFound(job_id)
        progress = self.redis.hgetall(self._progress_key(job_id))
        if not progress:
            return job
        latest = progress.pop("_latest")
        per_stage = {name: json.loads(entry) for name, entry in progress.items()}
        stages = [
            s.model_copy(update=per_stage[s.name]) if s.name in per_stage else s for s in job.stages
        ]
        return job.model_copy(update={**per_stage[latest], "stages": stages})

    def list_jobs(
        self,
        tenant: str,
        state: JobState | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> tuple[list[JobRecord], str | None]:
        """Jobs newest first; `cursor` is the last id of the previous page."""
        items: list[JobRecord] = []
        upper = f"({cursor}" if cursor else "+"
        batch = max(limit, 50)
        while len(items) < limit:
            ids = self.redis.zrevrangebylex(self._index_key(tenant), upper, "-", 0, batch)
            if not ids:
                return items, None
            for job_id in ids:
                upper = f"({job_id}"
                try:
                    job = self.get(job_id)
                except JobNotFound:
                    continue
                if state is None or job.state is state:
                    items.append(job)
                    if len(items) == limit:
                        return items, job_id
        return items, None

    def metrics_history(self, job_id: str) -> list[dict[str, Any]]:
        """Per-epoch metrics, one entry per (stage, epoch): the latest run's wins after a resume."""
        latest: dict[tuple[str, int], dict[str, Any]] = {}
        for _, fields in self.redis.xrange(self._metrics_key(job_id)):
            key = (fields["stage"], int(fields["epoch"]))
            latest.pop(key, None)  # keep insertion order = order of the run that produced it
            latest[key] = {
                "stage": fields["stage"],
                "epoch": int(fields["epoch"]),
                "token": int(fields["token"]),
                **json.loads(fields["metrics"]),
            }
        return sorted(latest.values(), key=lambda m: (m["stage"], m["epoch"]))

    # -- changes without a lease (API side) ---------------------------------------------------
    def request_cancel(self, job_id: str, tenant: str | None = None) -> JobRecord:
        """Cancel a queued job at once; flag a running one so its runner stops it."""

        def change(job: JobRecord) -> JobRecord:
            if tenant is not None and job.tenant != tenant:
                raise JobNotFound(job_id)
            if job.state is JobState.QUEUED:
                return advance(job, JobState.CANCELLED, error="cancelled by request")
            if job.state is JobState.RUNNING:
                return job.model_copy(update={"cancel_requested": True})
            raise InvalidTransition(job.id, job.state, JobState.CANCELLED)

        return self._update(job_id, change, token=None)

    # -- the runner's side: claim, heartbeat, fenced writes -----------------------------------
    def claim(self, consumer: str, lease_ttl_s: float, block_ms: int = 1000) -> Claim | None:
        """Take one job: one whose runner's lease has expired, else a new queue message."""
        self.ensure_group()
        idle_ms = int(lease_ttl_s * 1000)
        # Messages idle longer than a lease belong to runners that may be dead; a live runner's
        # lease makes _acquire pass them by, so a long job is never handed to a second runner.
        _, stale, _ = self.redis.xautoclaim(
            self.queue_key, GROUP, consumer, min_idle_time=idle_ms, start_id="0-0", count=10
        )
        for message_id, fields in stale:
            if fields and (claim := self._acquire(fields["job_id"], message_id, lease_ttl_s)):
                return claim
        fresh = self.redis.xreadgroup(
            GROUP, consumer, {self.queue_key: ">"}, count=1, block=max(block_ms, 1)
        )
        for _, entries in fresh:
            for message_id, fields in entries:
                if claim := self._acquire(fields["job_id"], message_id, lease_ttl_s):
                    return claim
        return None

    def _acquire(self, job_id: str, message_id: str, lease_ttl_s: float) -> Claim | None:
        job_key, lease_key = self._job_key(job_id), self._lease_key(job_id)
        with self.redis.pipeline() as pipe:
            for _ in range(_MAX_WATCH_RETRIES):
                try:
                    pipe.watch(job_key, lease_key)
                    try:
                        job = self._load(job_id, pipe)
                    except JobNotFound:
                        pipe.reset()
                        self.redis.xack(self.queue_key, GROUP, message_id)
                        return None
                    if pipe.exists(lease_key):
                        pipe.reset()
                        return None  # a live runner holds it
                    if is_terminal(job.state):
                        pipe.reset()
                        self.redis.xack(self.queue_key, GROUP, message_id)
                        return None
                    token = int(self.redis.incr(self._fence_key(job_id)))
                    if job.cancel_requested:
                        new = advance(job, JobState.CANCELLED, error="cancelled by request")
                    elif job.state is JobState.QUEUED:
                        new = advance(job, JobState.RUNNING, attempts=job.attempts + 1)
                    else:  # RUNNING with an expired lease: its runner is gone
                        note = f"attempt {job.attempts + 1}: taken over after the lease expired"
                        new = job.model_copy(
                            update={"attempts": job.attempts + 1, "warnings": [*job.warnings, note]}
                        )
                    pipe.multi()
                    pipe.set(job_key, new.model_dump_json())
                    if new.state is JobState.CANCELLED:
                        pipe.xack(self.queue_key, GROUP, message_id)
                    else:
                        pipe.set(lease_key, str(token), px=int(lease_ttl_s * 1000))
                    pipe.execute()
                    if new.state is JobState.CANCELLED:
                        return None
                    return Claim(job=new, token=token, message_id=message_id)
                except redis.WatchError:
                    continue
        return None

    def heartbeat(self, job_id: str, token: int, lease_ttl_s: float) -> bool:
        """Renew our lease; False means it is gone and the run must stop."""
        renewed = self._renew(
            keys=[self._lease_key(job_id)], args=[str(token), int(lease_ttl_s * 1000)]
        )
        return bool(renewed)

    def record_progress(
        self, job_id: str, token: int, stage: str, epoch: int, metrics: dict[str, float]
    ) -> bool:
        """Publish one epoch's metrics if the lease is still ours."""
        keys = [self._lease_key(job_id), self._progress_key(job_id), self._metrics_key(job_id)]
        ok = self._progress(keys=keys, args=[str(token), stage, epoch, json.dumps(metrics)])
        return bool(ok)

    def update(
        self, job_id: str, token: int, change: Callable[[JobRecord], JobRecord]
    ) -> JobRecord:
        """Apply `change` to the record if `token` still holds the lease; else LeaseLost."""
        return self._update(job_id, change, token=token)

    def finish(self, claim: Claim, state: JobState, **changes: Any) -> JobRecord:
        """Move a claimed job to a terminal state, release its lease and ack its message."""
        return self._update(
            claim.job.id,
            lambda job: advance(job, state, **changes),
            token=claim.token,
            release=claim.message_id,
        )

    def give_back(self, claim: Claim, reason: str) -> JobRecord:
        """Return a running job to the queue (shutdown): a new message, the old one acked."""

        def change(job: JobRecord) -> JobRecord:
            return advance(job, JobState.QUEUED, warnings=[*job.warnings, reason])

        return self._update(
            claim.job.id, change, token=claim.token, release=claim.message_id, requeue=True
        )

    def _update(
        self,
        job_id: str,
        change: Callable[[JobRecord], JobRecord],
        token: int | None,
        release: str | None = None,
        requeue: bool = False,
    ) -> JobRecord:
        job_key, lease_key = self._job_key(job_id), self._lease_key(job_id)
        with self.redis.pipeline() as pipe:
            for _ in range(_MAX_WATCH_RETRIES):
                try:
                    pipe.watch(job_key, lease_key)
                    if token is not None and pipe.get(lease_key) != str(token):
                        raise LeaseLost(job_id, token)
                    new = change(self._load(job_id, pipe))
                    pipe.multi()
                    pipe.set(job_key, new.model_dump_json())
                    if release is not None:
                        pipe.delete(lease_key)
                        pipe.xack(self.queue_key, GROUP, release)
                    if requeue:
                        pipe.xadd(self.queue_key, {"job_id": job_id})
                    pipe.execute()
                    return new
                except redis.WatchError:
                    continue
        raise RuntimeError(f"update of job {job_id}: too much contention")

    # -- dispatchers --------------------------------------------------------------------------
    def register_dispatcher(self, dispatcher_id: str, info: dict[str, Any], ttl_s: float) -> None:
        self.redis.set(self._dispatcher_key(dispatcher_id), json.dumps(info), px=int(ttl_s * 1000))

    def live_dispatchers(self) -> list[dict[str, Any]]:
        keys = list(self.redis.scan_iter(match=self._dispatcher_key("*"), count=100))
        values = self.redis.mget(keys) if keys else []
        return [json.loads(v) for v in values if v is not None]

"""JobStore: Redis as the system of record for jobs: submission, the queue, leases, fenced writes.

Jobs are JSON records. Each tenant has its own queue, ordered by priority, then submission time
(job ids sort by time); a claim takes the head of the queue of the tenant that runs the fewest
jobs, so one tenant's flood waits behind nobody else's single job. The claim moves the job from
its queue to the `active` set in the same transaction that makes it running, so a job is always
in one of the two until it ends and is never lost with a runner. A runner holds a lease
(`lease:{id}`, a fencing token with a TTL) that it renews by heartbeat; an active job whose
lease has expired is taken over by the next claim, and every write of a runner is checked
against its token, so a stale runner's writes are refused.

A finished job's keys expire after the retention time (or go at once with `delete`), and every
record change is announced on a capped `changes` stream that live event streams block on.
"""

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import redis

from shared.apikey_store import ApiKeyStore
from shared.claims import Claim, queue_score
from shared.dataset_index import DatasetIndex
from shared.dispatcher_registry import DispatcherRegistry
from shared.errors import InvalidTransition, JobNotFound, LeaseLost
from shared.jobs import JobRecord, JobState, advance, is_terminal
from shared.metrics import dumps_metrics, loads_metrics
from shared.redis_keys import Keys
from shared.scheduler import Scheduler
from shared.submissions import CHANGES_MAXLEN, Submissions
from shared.transactions import transact

log = logging.getLogger("aetrain.store")

DEFAULT_RETENTION_S = 30 * 24 * 3600
DEFAULT_MAX_TAKEOVERS = 3
_CLAIM_POLL_S = 0.2

# KEYS: lease. ARGV: token, ttl_ms. Renew only the lease we hold.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lease, progress, metrics stream. ARGV: token, stage, epoch, metrics json, maxlen.
# The progress hash has one field per stage ({"epoch", "metrics"}) and `_latest`, the stage
# that reported last. The stream is capped at what the job's epochs need (resumes included).
_PROGRESS = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local entry = '{"epoch": ' .. ARGV[3] .. ', "metrics": ' .. ARGV[4] .. '}'
redis.call('HSET', KEYS[2], ARGV[2], entry, '_latest', ARGV[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'stage', ARGV[2], 'epoch', ARGV[3],
           'metrics', ARGV[4], 'token', ARGV[1])
return 1
"""

# KEYS: a tenant's queue, waiting tenants. ARGV: tenant. Atomic against a submit's MULTI, so a
# tenant is never dropped while it has a queued job.
_DROP_IF_EMPTY = """
if redis.call('ZCARD', KEYS[1]) == 0 then return redis.call('SREM', KEYS[2], ARGV[1]) end
return 0
"""


def connect(url: str) -> redis.Redis:
    """A Redis client that fails fast when Redis is down instead of hanging."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=5,
        socket_connect_timeout=2,
        health_check_interval=10,
    )


def warn_if_redis_evicts(store: "JobStore", log: logging.Logger) -> None:
    """Say so loudly at start when Redis may evict keys: a job evicted is a job lost."""
    try:
        policy = store.eviction_policy()
    except redis.RedisError as exc:
        log.warning("could not read Redis's maxmemory-policy: %s", exc)
        return
    if policy != "noeviction":
        log.warning(
            "Redis's maxmemory-policy is %r: under memory pressure it may delete job records "
            "and queues. Set `maxmemory-policy noeviction` (a full Redis then refuses writes, "
            "which the API reports as 503).", policy,
        )  # fmt: skip


def record_with_progress(
    job_id: str, raw: str | None, progress: dict[str, str], tenant: str | None
) -> JobRecord:
    """A job's record (its stored JSON) with the progress its runner reported since (the
    `progress:<id>` hash); JobNotFound for a missing record or another tenant's job."""
    if raw is None:
        raise JobNotFound(job_id)
    job = JobRecord.model_validate_json(raw)
    if tenant is not None and job.tenant != tenant:
        raise JobNotFound(job_id)
    if not progress or "_latest" not in progress:
        return job
    latest = progress.pop("_latest")
    per_stage = {name: loads_metrics(entry) for name, entry in progress.items()}
    stages = [
        s.model_copy(update=per_stage[s.name]) if s.name in per_stage else s for s in job.stages
    ]
    return job.model_copy(update={**per_stage.get(latest, {}), "stages": stages})


def metrics_cap(job: JobRecord) -> int:
    """Entries a job's metrics stream may hold: every epoch of every stage, twice over (a
    resume repeats epochs), so the cap never cuts a job's own history but bounds a loop."""
    return 2 * sum(max(stage.epochs, 1) for stage in job.stages) + 100


class JobStore:
    def __init__(
        self, client: redis.Redis, prefix: str = "aetrain",
        retention_s: float = DEFAULT_RETENTION_S,
    ) -> None:  # fmt: skip
        # redis-py's stubs type every reply as a sync/async union; Any keeps the calls readable.
        self.redis: Any = client
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.retention_s = retention_s
        self.scheduler = Scheduler(client, self.keys)
        self.datasets = DatasetIndex(client, self.keys)
        self.api_keys = ApiKeyStore(client, self.keys)
        self.dispatchers = DispatcherRegistry(client, self.keys)
        self.submissions = Submissions(client, self.keys)
        self._renew = client.register_script(_RENEW)
        self._progress = client.register_script(_PROGRESS)
        self._drop_if_empty = client.register_script(_DROP_IF_EMPTY)

    def ping(self) -> bool:
        return bool(self.redis.ping())

    def eviction_policy(self) -> str:
        """Redis's maxmemory-policy; anything but `noeviction` may silently drop jobs.

        "unknown" where CONFIG is not allowed (some managed Redis services).
        """
        try:
            reply = self.redis.config_get("maxmemory-policy")
        except redis.ResponseError:
            return "unknown"
        return str(reply.get("maxmemory-policy", "unknown"))

    # -- submission and reads -----------------------------------------------------------------
    def submit(
        self,
        job: JobRecord,
        idempotency_key: str | None = None,
        max_open: int | None = None,
        max_per_minute: int | None = None,
    ) -> tuple[JobRecord, bool]:
        """Store and enqueue a job in one script (shared/submissions.py); (record, created).

        With an idempotency key seen before for the same spec, returns the first job instead.
        With `max_open`, a tenant that already has that many jobs queued or running gets
        TooManyJobs; with `max_per_minute`, one past that many submissions this clock minute
        gets RateLimited. A retry with a known idempotency key counts against neither.
        """
        stored = self.submissions.store(job, idempotency_key, max_open, max_per_minute)
        if stored.first_job_id is None:
            return job, True
        return self.get(stored.first_job_id, tenant=job.tenant), False

    def _announce(self, pipe: Any, job_id: str) -> None:
        pipe.xadd(self.keys.changes, {"job": job_id}, maxlen=CHANGES_MAXLEN, approximate=True)

    def _load(self, job_id: str, client: Any = None) -> JobRecord:
        raw = (client or self.redis).get(self.keys.job(job_id))
        if raw is None:
            raise JobNotFound(job_id)
        return JobRecord.model_validate_json(raw)

    def get(self, job_id: str, tenant: str | None = None) -> JobRecord:
        """The job record with its live progress; another tenant's job is JobNotFound."""
        # One round trip for both: the record and its progress hash.
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(self.keys.job(job_id))
        pipe.hgetall(self.keys.progress(job_id))
        raw, progress = pipe.execute()
        return record_with_progress(job_id, raw, progress, tenant)

    def list_jobs(
        self,
        tenant: str,
        state: JobState | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> tuple[list[JobRecord], str | None]:
        """Jobs newest first; `cursor` is the last id of the previous page.

        With `state`, only that state's index is read, so a page costs the same with 10 jobs
        or 100,000 in other states. Index entries of jobs that expired or were deleted are
        dropped on the way.
        """
        items: list[JobRecord] = []
        upper = f"({cursor}" if cursor else "+"
        batch = max(limit, 50)
        index = self.keys.index(tenant) if state is None else self.keys.state_index(tenant, state)
        while len(items) < limit:
            ids = self.redis.zrevrangebylex(index, upper, "-", 0, batch)
            if not ids:
                return items, None
            for job_id in ids:
                upper = f"({job_id}"
                try:
                    job = self.get(job_id)
                except JobNotFound:
                    self.redis.zrem(index, job_id)
                    continue
                except ValueError as exc:  # a record we cannot read must not hide the others
                    log.error("job %s: unreadable record left out of the list: %s", job_id, exc)
                    continue
                if state is None or job.state is state:
                    items.append(job)
                    if len(items) == limit:
                        return items, job_id
        return items, None

    def metrics_history(self, job_id: str) -> list[dict[str, Any]]:
        """Per-epoch metrics, one entry per (stage, epoch): the latest run's wins after a resume."""
        latest: dict[tuple[str, int], dict[str, Any]] = {}
        for _, fields in self.redis.xrange(self.keys.metrics(job_id)):
            key = (fields["stage"], int(fields["epoch"]))
            latest.pop(key, None)  # keep insertion order = order of the run that produced it
            latest[key] = {
                "stage": fields["stage"],
                "epoch": int(fields["epoch"]),
                "token": int(fields["token"]),
                **loads_metrics(fields["metrics"]),
            }
        return sorted(latest.values(), key=lambda m: (m["stage"], m["epoch"]))

    def metrics_after(
        self, job_id: str, after: str = "-", count: int = 1000
    ) -> list[tuple[str, dict[str, Any]]]:
        """Per-epoch metrics published after entry `after` ("-": from the start), with ids."""
        start = after if after == "-" else f"({after}"
        entries = self.redis.xrange(self.keys.metrics(job_id), start, "+", count=count)
        return [
            (entry_id, {"stage": f["stage"], "epoch": int(f["epoch"]), "token": int(f["token"]),
                        "metrics": loads_metrics(f["metrics"])})
            for entry_id, f in entries
        ]  # fmt: skip

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

    def delete(self, job_id: str, tenant: str | None = None) -> JobRecord:
        """Delete a finished job's record, progress, metrics and index entries; returns it.

        A queued or running job is InvalidTransition (cancel it first); the caller deletes the
        job's files in storage.
        """
        job_key = self.keys.job(job_id)

        def body(pipe: Any) -> JobRecord:
            job = self._load(job_id, pipe)
            if tenant is not None and job.tenant != tenant:
                raise JobNotFound(job_id)
            if not is_terminal(job.state):
                raise InvalidTransition(job.id, job.state, "deleted")
            pipe.multi()
            pipe.delete(*self.keys.job_keys(job_id))
            pipe.zrem(self.keys.index(job.tenant), job_id)
            pipe.zrem(self.keys.state_index(job.tenant, job.state), job_id)
            pipe.srem(self.keys.open_jobs(job.tenant), job_id)
            self._announce(pipe, job_id)
            pipe.execute()
            return job

        return transact(self.redis, [job_key], body, f"delete of job {job_id}")

    def tenants(self) -> list[str]:
        return sorted(self.redis.smembers(self.keys.tenants))

    def prune_index(self, tenant: str, batch: int = 500) -> int:
        """Drop a tenant's index entries whose record has expired; returns how many went from
        the main index (the per-state indexes are pruned alike)."""
        indexes = [self.keys.index(tenant), *(self.keys.state_index(tenant, s) for s in JobState)]
        counts = [self._prune(index, batch) for index in indexes]
        return counts[0]

    def index_states(self, batch: int = 500) -> int:
        """Put every listed job into the index of its state, once per database (the per-state
        indexes came after jobs were already stored); returns how many were indexed."""
        if not self.redis.set(self.keys.state_indexes_built, "1", nx=True):
            return 0
        indexed = 0
        for tenant in self.tenants():
            start = 0
            while ids := self.redis.zrange(self.keys.index(tenant), start, start + batch - 1):
                start += len(ids)
                for job_id, raw in zip(ids, self.redis.mget(
                        [self.keys.job(i) for i in ids]), strict=True):  # fmt: skip
                    if raw is not None:
                        state = json.loads(raw)["state"]
                        self.redis.zadd(self.keys.state_index(tenant, state), {job_id: 0})
                        indexed += 1
        return indexed

    def _prune(self, index: str, batch: int) -> int:
        dropped, start = 0, 0
        while ids := self.redis.zrange(index, start, start + batch - 1):
            exists = self.redis.pipeline(transaction=False)
            for job_id in ids:
                exists.exists(self.keys.job(job_id))
            gone = [job_id for job_id, alive in zip(ids, exists.execute(), strict=True)
                    if not alive]  # fmt: skip
            if gone:
                self.redis.zrem(index, *gone)
            dropped += len(gone)
            start += len(ids) - len(gone)
        return dropped

    # -- the runner's side: claim, heartbeat, fenced writes -----------------------------------
    def claim(
        self,
        consumer: str,
        lease_ttl_s: float,
        block_ms: int = 1000,
        max_takeovers: int = DEFAULT_MAX_TAKEOVERS,
        takeovers_only: bool = False,
        stop: Callable[[], bool] = lambda: False,
    ) -> Claim | None:
        """Take one job: an active one whose runner's lease expired, else the next queued one.

        `consumer` names the runner in a takeover's warning; waits up to `block_ms` for work. A
        job whose runner was lost more than `max_takeovers` times fails instead of being
        taken over again, so a job that kills its dispatcher cannot take the service down.
        With `takeovers_only`, new jobs stay queued (the caller has no room for them). Waiting
        ends early once `stop()` is true, so that a runner shutting down takes nothing new.
        """
        deadline = time.monotonic() + block_ms / 1000
        while not stop():
            for job_id in sorted(self.redis.smembers(self.keys.active)):
                if not self.redis.exists(self.keys.lease(job_id)):
                    if claim := self._acquire(job_id, lease_ttl_s, consumer, max_takeovers):
                        return claim
            for job_id in [] if takeovers_only else self._fair_heads():
                if claim := self._acquire(job_id, lease_ttl_s, consumer, max_takeovers):
                    return claim
            if time.monotonic() >= deadline:
                return None
            time.sleep(min(_CLAIM_POLL_S, max(0.0, deadline - time.monotonic())))
        return None

    def _fair_heads(self) -> list[str]:
        """The head job of each tenant's queue, fairest first.

        A tenant running fewer jobs goes first, so tenants with waiting work share the cluster
        by their running share; between equal shares, the tenant served longest ago (so that
        jobs run one at a time still take turns), then the higher priority, then the older
        job. Priority thus orders a tenant's own jobs and never lets one tenant jump another.
        """
        tenants = sorted(self.redis.smembers(self.keys.waiting_tenants))
        if not tenants:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for tenant in tenants:
            pipe.zrange(self.keys.tenant_queue(tenant), 0, 0, withscores=True)
            pipe.scard(self.keys.running(tenant))
        pipe.hmget(self.keys.served, tenants)
        *replies, served = pipe.execute()
        heads: list[tuple[int, int, float, str]] = []
        for i, tenant in enumerate(tenants):
            head, running = replies[2 * i], replies[2 * i + 1]
            if not head:
                keys = [self.keys.tenant_queue(tenant), self.keys.waiting_tenants]
                self._drop_if_empty(keys=keys, args=[tenant])
                continue
            job_id, score = head[0]
            heads.append((int(running), int(served[i] or 0), float(score), job_id))
        return [job_id for *_, job_id in sorted(heads)]

    def queued_ids(self, tenant: str | None = None) -> list[str]:
        """Queued jobs (of one tenant, or all) by priority, then age."""
        tenants = [tenant] if tenant else sorted(self.redis.smembers(self.keys.waiting_tenants))
        entries = [
            (score, job_id)
            for t in tenants
            for job_id, score in self.redis.zrange(
                self.keys.tenant_queue(t), 0, -1, withscores=True
            )  # fmt: skip
        ]
        return [job_id for _, job_id in sorted(entries)]

    def _acquire(
        self, job_id: str, lease_ttl_s: float, consumer: str, max_takeovers: int
    ) -> Claim | None:
        job_key, lease_key = self.keys.job(job_id), self.keys.lease(job_id)

        def body(pipe: Any) -> Claim | None:
            try:
                job = self._load(job_id, pipe)
            except JobNotFound:
                self._forget(job_id)
                return None
            if pipe.exists(lease_key):
                return None  # a live runner holds it
            if is_terminal(job.state):
                self._forget(job_id, job.tenant)
                return None
            token = int(self.redis.incr(self.keys.fence(job_id)))
            if job.cancel_requested:
                new = advance(job, JobState.CANCELLED, error="cancelled by request")
            elif job.state is JobState.QUEUED:
                new = advance(job, JobState.RUNNING, attempts=job.attempts + 1)
            elif job.takeovers >= max_takeovers:  # its runner keeps dying: a poison job
                error = (f"gave up after {job.takeovers + 1} runs whose runner was lost "
                         "(a dispatcher killed or out of memory each time)")  # fmt: skip
                new = advance(job, JobState.FAILED, error=error)
            else:  # RUNNING with an expired lease: its runner is gone
                note = (f"attempt {job.attempts + 1}: taken over by {consumer} after the "
                        "lease expired")  # fmt: skip
                new = job.model_copy(update={
                    "attempts": job.attempts + 1, "takeovers": job.takeovers + 1,
                    "warnings": [*job.warnings, note],
                })  # fmt: skip
            pipe.multi()
            self._write(pipe, new)
            if not is_terminal(new.state):
                pipe.set(lease_key, str(token), px=int(lease_ttl_s * 1000))
            if job.state is JobState.QUEUED and new.state is JobState.RUNNING:
                pipe.hset(self.keys.served, job.tenant, int(time.time() * 1000))
            pipe.execute()
            return None if is_terminal(new.state) else Claim(job=new, token=token)

        return transact(self.redis, [job_key, lease_key], body, f"claim of job {job_id}")

    def _write(self, pipe: Any, job: JobRecord) -> None:
        """Queue the writes that store `job` and keep the queue, active and open sets in step
        with its state (inside a MULTI)."""
        job_id, tenant = job.id, job.tenant
        pipe.set(self.keys.job(job_id), job.model_dump_json())
        for state in JobState:
            if state is job.state:
                pipe.zadd(self.keys.state_index(tenant, state), {job_id: 0})
            else:
                pipe.zrem(self.keys.state_index(tenant, state), job_id)
        if job.state is JobState.QUEUED:
            pipe.srem(self.keys.active, job_id)
            pipe.srem(self.keys.running(tenant), job_id)
            pipe.zadd(self.keys.tenant_queue(tenant), {job_id: queue_score(job)})
            pipe.sadd(self.keys.waiting_tenants, tenant)
        elif job.state is JobState.RUNNING:
            pipe.zrem(self.keys.tenant_queue(tenant), job_id)
            pipe.sadd(self.keys.active, job_id)
            pipe.sadd(self.keys.running(tenant), job_id)
        else:  # terminal: out of every set, and its keys live on for the retention time
            pipe.zrem(self.keys.tenant_queue(tenant), job_id)
            pipe.srem(self.keys.active, job_id)
            pipe.srem(self.keys.running(tenant), job_id)
            pipe.srem(self.keys.open_jobs(tenant), job_id)
            for key in self.keys.job_keys(job_id):
                pipe.expire(key, max(1, int(self.retention_s)))
        self._announce(pipe, job_id)

    def _forget(self, job_id: str, tenant: str | None = None) -> None:
        self.redis.srem(self.keys.active, job_id)
        if tenant is not None:
            self.redis.zrem(self.keys.tenant_queue(tenant), job_id)
            self.redis.srem(self.keys.running(tenant), job_id)

    def heartbeat(self, job_id: str, token: int, lease_ttl_s: float) -> bool:
        """Renew our lease; False means it is gone and the run must stop."""
        renewed = self._renew(
            keys=[self.keys.lease(job_id)], args=[str(token), int(lease_ttl_s * 1000)]
        )
        return bool(renewed)

    def holds_lease(self, job_id: str, token: int) -> bool:
        """Whether `token` still holds the job's lease (a read; nothing is renewed).

        For writes outside Redis (files in storage) that the lease must fence: a True is
        only as fresh as the read, so a caller checks it just before it writes.
        """
        return bool(self.redis.get(self.keys.lease(job_id)) == str(token))

    def record_progress(
        self, job_id: str, token: int, stage: str, epoch: int, metrics: dict[str, Any],
        cap: int = 100_000,
    ) -> bool:  # fmt: skip
        """Publish one epoch's metrics if the lease is still ours (non-finite values as null).

        `cap` bounds the job's metrics stream (see `metrics_cap`).
        """
        keys = [self.keys.lease(job_id), self.keys.progress(job_id), self.keys.metrics(job_id)]
        document = dumps_metrics(metrics)
        ok = self._progress(keys=keys, args=[str(token), stage, epoch, document, cap])
        return bool(ok)

    def update(
        self, job_id: str, token: int, change: Callable[[JobRecord], JobRecord]
    ) -> JobRecord:
        """Apply `change` to the record if `token` still holds the lease; else LeaseLost."""
        return self._update(job_id, change, token=token)

    def finish(self, claim: Claim, state: JobState, **changes: Any) -> JobRecord:
        """Move a claimed job to a terminal state and release its lease."""
        return self._update(
            claim.job.id, lambda job: advance(job, state, **changes), token=claim.token,
            release=True,
        )  # fmt: skip

    def give_back(self, claim: Claim, reason: str) -> JobRecord:
        """Return a running job to the queue (shutdown), in its place by priority and age."""

        def change(job: JobRecord) -> JobRecord:
            return advance(job, JobState.QUEUED, warnings=[*job.warnings, reason])

        return self._update(claim.job.id, change, token=claim.token, release=True)

    def _update(
        self,
        job_id: str,
        change: Callable[[JobRecord], JobRecord],
        token: int | None,
        release: bool = False,
    ) -> JobRecord:
        job_key, lease_key = self.keys.job(job_id), self.keys.lease(job_id)

        def body(pipe: Any) -> JobRecord:
            if token is not None and pipe.get(lease_key) != str(token):
                raise LeaseLost(job_id, token)
            new = change(self._load(job_id, pipe))
            pipe.multi()
            self._write(pipe, new)
            if release:
                pipe.delete(lease_key)
            pipe.execute()
            return new

        return transact(self.redis, [job_key, lease_key], body, f"update of job {job_id}")

"""JobStore: Redis as the system of record, and the only module that knows Redis keys.

Jobs are JSON records. The queue is a sorted set ordered by priority, then submission time
(job ids sort by time); a claim moves a job from the queue to the `active` set in the same
transaction that makes it running, so a job is always in one of the two until it ends and is
never lost with a runner. A runner holds a lease (`lease:{id}`, a fencing token with a TTL) that
it renews by heartbeat; an active job whose lease has expired is taken over by the next claim,
and every write of a runner is checked against its token, so a stale runner's writes are refused.

Stages ask the scheduler for their resources (`reserve`) before they are handed to Ray; grants
go strictly in queue order, so a big stage is never starved by a stream of small ones.
"""

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from shared import apikeys
from shared.datasets import DatasetInfo
from shared.errors import (
    DatasetNotFound,
    IdempotencyConflict,
    InvalidTransition,
    JobNotFound,
    LeaseLost,
    TooManyJobs,
)
from shared.jobs import JobRecord, JobState, advance, is_terminal

IDEMPOTENCY_TTL_S = 24 * 3600
_MAX_WATCH_RETRIES = 50
_CLAIM_POLL_S = 0.2
DEFAULT_MAX_TAKEOVERS = 3

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

# KEYS: scheduler hash (stage -> {job, token, need, granted}), waiting zset (order of asks).
# ARGV: stage key, job id, token, need json, cluster total json, queue score, lease key prefix.
# Entries of runners whose lease is gone are dropped first, so a dead dispatcher's stages give
# their resources back once its lease expires. (Lease keys are built here rather than passed
# in KEYS: fine on a single Redis, the only deployment we support.)
_RESERVE = """
local granted_use = {}
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local entry = cjson.decode(entries[i + 1])
  if redis.call('GET', ARGV[7] .. entry.job) ~= entry.token then
    redis.call('HDEL', KEYS[1], entries[i])
    redis.call('ZREM', KEYS[2], entries[i])
  elseif entry.granted then
    for kind, amount in pairs(entry.need) do
      granted_use[kind] = (granted_use[kind] or 0) + amount
    end
  end
end
if ARGV[1] == '' then return cjson.encode(granted_use) end
local mine = redis.call('HGET', KEYS[1], ARGV[1])
if mine and cjson.decode(mine).granted then return 'granted' end
local need = cjson.decode(ARGV[4])
local total = cjson.decode(ARGV[5])
local entry = {job = ARGV[2], token = ARGV[3], need = need, granted = false}
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(entry))
redis.call('ZADD', KEYS[2], 'NX', ARGV[6], ARGV[1])
if redis.call('ZRANGE', KEYS[2], 0, 0)[1] ~= ARGV[1] then return 'behind' end
for kind, amount in pairs(need) do
  if (total[kind] or 0) - (granted_use[kind] or 0) + 1e-9 < amount then return 'no room' end
end
entry.granted = true
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(entry))
redis.call('ZREM', KEYS[2], ARGV[1])
return 'granted'
"""


@dataclass(frozen=True)
class Claim:
    """A job this runner now holds: its record and fencing token."""

    job: JobRecord
    token: int


def connect(url: str) -> redis.Redis:
    """A Redis client that fails fast when Redis is down instead of hanging."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=5,
        socket_connect_timeout=2,
        health_check_interval=10,
    )


def queue_score(job: JobRecord) -> int:
    """Lower starts first: higher priority first; ties go by job id, which sorts by time."""
    return -job.spec.priority


def spec_digest(spec_json: str) -> str:
    return hashlib.sha256(spec_json.encode()).hexdigest()


class JobStore:
    def __init__(self, client: redis.Redis, prefix: str = "aetrain") -> None:
        # redis-py's stubs type every reply as a sync/async union; Any keeps the calls readable.
        self.redis: Any = client
        self.prefix = prefix
        self._renew = client.register_script(_RENEW)
        self._progress = client.register_script(_PROGRESS)
        self._reserve = client.register_script(_RESERVE)

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

    def _open_key(self, tenant: str) -> str:
        """A tenant's jobs that are queued or running: what the per-tenant limit counts."""
        return f"{self.prefix}:open:{tenant}"

    def _datasets_key(self, tenant: str) -> str:
        return f"{self.prefix}:datasets:{tenant}"

    def _dispatcher_key(self, dispatcher_id: str) -> str:
        return f"{self.prefix}:dispatcher:{dispatcher_id}"

    @property
    def queue_key(self) -> str:
        return f"{self.prefix}:queue"

    @property
    def active_key(self) -> str:
        return f"{self.prefix}:active"

    @property
    def _scheduler_key(self) -> str:
        return f"{self.prefix}:scheduler"

    @property
    def _waiting_key(self) -> str:
        return f"{self.prefix}:waiting"

    # -- submission and reads -----------------------------------------------------------------
    def ping(self) -> bool:
        return bool(self.redis.ping())

    def submit(
        self, job: JobRecord, idempotency_key: str | None = None, max_open: int | None = None
    ) -> tuple[JobRecord, bool]:
        """Store and enqueue a job in one transaction; returns (record, created).

        With an idempotency key seen before for the same spec, returns the first job instead.
        With `max_open`, a tenant that already has that many jobs queued or running gets
        TooManyJobs.
        """
        spec_json = job.spec.model_dump_json()
        idem_key = self._idempotency_key(job.tenant, idempotency_key) if idempotency_key else None
        open_key = self._open_key(job.tenant)
        with self.redis.pipeline() as pipe:
            for _ in range(_MAX_WATCH_RETRIES):
                try:
                    pipe.watch(open_key, *([idem_key] if idem_key else []))
                    if idem_key:
                        seen = pipe.get(idem_key)
                        if seen is not None:
                            pipe.reset()
                            first = json.loads(seen)
                            if first["digest"] != spec_digest(spec_json):
                                raise IdempotencyConflict(idempotency_key or "")
                            return self.get(first["job_id"], tenant=job.tenant), False
                    if max_open is not None and pipe.scard(open_key) >= max_open:
                        pipe.reset()
                        raise TooManyJobs(job.tenant, max_open)
                    pipe.multi()
                    pipe.set(self._job_key(job.id), job.model_dump_json())
                    pipe.zadd(self._index_key(job.tenant), {job.id: 0})
                    pipe.zadd(self.queue_key, {job.id: queue_score(job)})
                    pipe.sadd(open_key, job.id)
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

    def metrics_after(self, job_id: str, after: str = "-") -> list[tuple[str, dict[str, Any]]]:
        """Per-epoch metrics published after entry `after` ("-": from the start), with ids."""
        start = after if after == "-" else f"({after}"
        entries = self.redis.xrange(self._metrics_key(job_id), start, "+", count=1000)
        return [
            (entry_id, {"stage": f["stage"], "epoch": int(f["epoch"]), "token": int(f["token"]),
                        "metrics": json.loads(f["metrics"])})
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
        """Take one job: an active one whose runner's lease expired, else the head of the queue.

        `consumer` names the runner in a takeover's warning; waits up to `block_ms` for work. A
        job whose runner was lost more than `max_takeovers` times fails instead of being
        taken over again, so a job that kills its dispatcher cannot take the service down.
        With `takeovers_only`, new jobs stay queued (the caller has no room for them). Waiting
        ends early once `stop()` is true, so that a runner shutting down takes nothing new.
        """
        deadline = time.monotonic() + block_ms / 1000
        while not stop():
            for job_id in sorted(self.redis.smembers(self.active_key)):
                if not self.redis.exists(self._lease_key(job_id)):
                    if claim := self._acquire(job_id, lease_ttl_s, consumer, max_takeovers):
                        return claim
            for job_id in [] if takeovers_only else self.redis.zrange(self.queue_key, 0, 9):
                if claim := self._acquire(job_id, lease_ttl_s, consumer, max_takeovers):
                    return claim
            if time.monotonic() >= deadline:
                return None
            time.sleep(min(_CLAIM_POLL_S, max(0.0, deadline - time.monotonic())))
        return None

    def queued_ids(self) -> list[str]:
        """The queue in the order jobs will start."""
        return list(self.redis.zrange(self.queue_key, 0, -1))

    def _acquire(
        self, job_id: str, lease_ttl_s: float, consumer: str, max_takeovers: int
    ) -> Claim | None:
        job_key, lease_key = self._job_key(job_id), self._lease_key(job_id)
        with self.redis.pipeline() as pipe:
            for _ in range(_MAX_WATCH_RETRIES):
                try:
                    pipe.watch(job_key, lease_key)
                    try:
                        job = self._load(job_id, pipe)
                    except JobNotFound:
                        pipe.reset()
                        self._forget(job_id)
                        return None
                    if pipe.exists(lease_key):
                        pipe.reset()
                        return None  # a live runner holds it
                    if is_terminal(job.state):
                        pipe.reset()
                        self._forget(job_id)
                        return None
                    token = int(self.redis.incr(self._fence_key(job_id)))
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
                    pipe.set(job_key, new.model_dump_json())
                    pipe.zrem(self.queue_key, job_id)
                    if is_terminal(new.state):
                        pipe.srem(self.active_key, job_id)
                        pipe.srem(self._open_key(job.tenant), job_id)
                    else:
                        pipe.sadd(self.active_key, job_id)
                        pipe.set(lease_key, str(token), px=int(lease_ttl_s * 1000))
                    pipe.execute()
                    if is_terminal(new.state):
                        return None
                    return Claim(job=new, token=token)
                except redis.WatchError:
                    continue
        return None

    def _forget(self, job_id: str) -> None:
        self.redis.zrem(self.queue_key, job_id)
        self.redis.srem(self.active_key, job_id)  # (the open set is cleaned with the record)

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
                    if release:
                        pipe.delete(lease_key)
                    if new.state is JobState.QUEUED:
                        pipe.srem(self.active_key, job_id)
                        pipe.zadd(self.queue_key, {job_id: queue_score(new)})
                    elif is_terminal(new.state):
                        pipe.srem(self.active_key, job_id)
                        pipe.zrem(self.queue_key, job_id)
                        pipe.srem(self._open_key(new.tenant), job_id)
                    pipe.execute()
                    return new
                except redis.WatchError:
                    continue
        raise RuntimeError(f"update of job {job_id}: too much contention")

    # -- uploaded datasets ----------------------------------------------------------------------
    def add_dataset(self, tenant: str, info: DatasetInfo) -> tuple[DatasetInfo, bool]:
        """Index an upload for a tenant; the same bytes again return the first entry."""
        if self.redis.hsetnx(self._datasets_key(tenant), info.id, info.model_dump_json()):
            return info, True
        return self.get_dataset(tenant, info.id), False

    def get_dataset(self, tenant: str, dataset_id: str) -> DatasetInfo:
        raw = self.redis.hget(self._datasets_key(tenant), dataset_id)
        if raw is None:
            raise DatasetNotFound(dataset_id)
        return DatasetInfo.model_validate_json(raw)

    def list_datasets(self, tenant: str) -> list[DatasetInfo]:
        """A tenant's uploads, newest first."""
        raw = self.redis.hvals(self._datasets_key(tenant))
        infos = [DatasetInfo.model_validate_json(r) for r in raw]
        return sorted(infos, key=lambda info: (info.created_at, info.id), reverse=True)

    # -- the scheduler: resources of stages handed to Ray ----------------------------------------
    def reserve(
        self,
        claim: Claim,
        stage: str,
        need: dict[str, float],
        total: dict[str, float],
    ) -> str:
        """Ask for `need` out of a cluster of `total`: 'granted', 'behind' or 'no room'.

        Asks wait in queue order (priority, then job age, then stage) and the first one is
        granted as soon as it fits; asking again keeps the place in line.
        """
        job = claim.job
        keys = [self._scheduler_key, self._waiting_key]
        args: list[str | int] = [f"{job.id}/{stage}", job.id, str(claim.token), json.dumps(need),
                json.dumps(total), queue_score(job), self._lease_key("")]  # fmt: skip
        return str(self._reserve(keys=keys, args=args))

    def asking_jobs(self) -> set[str]:
        """Jobs with a stage granted resources or waiting in line for them."""
        return {member.split("/")[0] for member in self.redis.hkeys(self._scheduler_key)}

    def release(self, job_id: str, stage: str) -> None:
        """Give a stage's resources back (or leave the line)."""
        member = f"{job_id}/{stage}"
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self._scheduler_key, member)
            pipe.zrem(self._waiting_key, member)
            pipe.execute()

    def reserved(self) -> tuple[dict[str, float], int]:
        """Resources granted to live stages, and how many stages wait for theirs."""
        keys = [self._scheduler_key, self._waiting_key]
        # An empty stage key makes the script only sweep and sum (cjson writes {} when empty).
        used = json.loads(
            self._reserve(keys=keys, args=["", "", "", "", "", 0, self._lease_key("")])
        )
        waiting = int(self.redis.zcard(self._waiting_key))
        return {kind: float(amount) for kind, amount in used.items()}, waiting

    # -- dispatchers --------------------------------------------------------------------------
    def register_dispatcher(self, dispatcher_id: str, info: dict[str, Any], ttl_s: float) -> None:
        self.redis.set(self._dispatcher_key(dispatcher_id), json.dumps(info), px=int(ttl_s * 1000))

    def live_dispatchers(self) -> list[dict[str, Any]]:
        keys = list(self.redis.scan_iter(match=self._dispatcher_key("*"), count=100))
        values = self.redis.mget(keys) if keys else []
        return [json.loads(v) for v in values if v is not None]

    # == API keys ==============================================================================
    # -- API keys: bearer keys of tenants, stored as sha256 digests only (shared/apikeys.py).
    #   apikey:<digest>   hash {key_id, tenant}: the lookup of every authenticated request
    #   apikeyid:<key id> hash {tenant, digest, created_at, revoked_at}: listing and revocation
    #   apikeys           sorted set of key ids by creation time
    def _api_key_key(self, key_digest: str) -> str:
        return f"{self.prefix}:apikey:{key_digest}"

    def _api_key_id_key(self, key_id: str) -> str:
        return f"{self.prefix}:apikeyid:{key_id}"

    @property
    def _api_keys_index(self) -> str:
        return f"{self.prefix}:apikeys"

    def create_api_key(self, tenant: str) -> tuple[str, str]:
        """A new key of `tenant`: (key id, key). The key is shown once; only its digest stays."""
        apikeys.check_tenant(tenant)
        key_id, key = apikeys.new_key()
        key_digest = apikeys.digest(key)
        created_at = apikeys.now_iso()
        with self.redis.pipeline() as pipe:  # MULTI: a key is usable only once it is listed
            pipe.hset(self._api_key_key(key_digest), mapping={"key_id": key_id, "tenant": tenant})
            pipe.hset(
                self._api_key_id_key(key_id),
                mapping={"tenant": tenant, "digest": key_digest, "created_at": created_at},
            )
            seconds, micros = self.redis.time()  # one clock for every API process
            pipe.zadd(self._api_keys_index, {key_id: seconds * 1_000_000 + micros})
            pipe.execute()
        return key_id, key

    def tenant_for_key(self, key: str) -> str | None:
        """The tenant of a live key; None for an unknown, revoked or malformed one."""
        if not apikeys.looks_like_key(key):
            return None
        tenant: str | None = self.redis.hget(self._api_key_key(apikeys.digest(key)), "tenant")
        return tenant

    def revoke_api_key(self, key_id: str) -> bool:
        """Revoke a key by its id at once; False if there is no live key with that id."""
        id_key = self._api_key_id_key(key_id)
        with self.redis.pipeline() as pipe:
            for _ in range(_MAX_WATCH_RETRIES):
                try:
                    pipe.watch(id_key)
                    entry = pipe.hgetall(id_key)
                    if not entry or entry.get("revoked_at"):
                        pipe.reset()
                        return False
                    pipe.multi()
                    pipe.delete(self._api_key_key(entry["digest"]))
                    pipe.hset(id_key, "revoked_at", apikeys.now_iso())
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue
        raise RuntimeError(f"revoke of API key {key_id}: too much contention")

    def list_api_keys(self, tenant: str | None = None) -> list[dict[str, str | None]]:
        """Keys oldest first (of one tenant, or all), revoked ones included; never a secret.

        Each is {key_id, tenant, created_at, revoked_at}; revoked_at is None while it is live.
        """
        infos: list[dict[str, str | None]] = []
        for key_id in self.redis.zrange(self._api_keys_index, 0, -1):
            entry = self.redis.hgetall(self._api_key_id_key(key_id))
            if not entry or (tenant is not None and entry["tenant"] != tenant):
                continue
            infos.append(
                {
                    "key_id": key_id,
                    "tenant": entry["tenant"],
                    "created_at": entry["created_at"],
                    "revoked_at": entry.get("revoked_at"),
                }
            )
        return infos

"""Submissions: a job stored and queued in one Lua script, its tenant's limits checked in it.

One script, not a WATCH/MULTI transaction: every submission of a tenant writes its open-jobs
set and its submissions counter, so with the keys watched, concurrent submissions of one
tenant failed each other's EXEC and went round again (8 clients of one tenant: p99 108 ms,
and past 50 retries a 500 "too much contention"). The script also makes one round trip of
what took four (WATCH, SCARD, GET, MULTI/EXEC).
"""

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from shared.claims import queue_score
from shared.errors import IdempotencyConflict, RateLimited, TooManyJobs
from shared.jobs import JobRecord
from shared.redis_keys import Keys

IDEMPOTENCY_TTL_S = 24 * 3600
CHANGES_MAXLEN = 10_000  # the changes stream only wakes live readers; old entries are moot
RATE_WINDOW_TTL_S = 120  # a clock minute's counter outlives its minute
NO_LIMIT = -1

# KEYS: job, tenant index, state index, tenant queue, waiting tenants, tenants, open jobs,
# this minute's submissions, changes stream, then the idempotency key if there is one (not an
# empty name in its place: a Redis user limited to aetrain's prefix by an ACL may not name it).
# ARGV: job id, record, queue score, tenant, max open, max per minute (-1: none),
# idempotency entry, its ttl, the changes stream's cap, the minute counter's ttl.
# Returns {'created'}, {'seen', entry}, {'too_many'} or {'rate_limited'}. A known idempotency
# key is answered before the limits: a retry counts against neither.
_SUBMIT = """
if #KEYS == 10 then
  local seen = redis.call('GET', KEYS[10])
  if seen then return {'seen', seen} end
end
local max_open = tonumber(ARGV[5])
if max_open >= 0 and redis.call('SCARD', KEYS[7]) >= max_open then return {'too_many'} end
local max_rate = tonumber(ARGV[6])
if max_rate >= 0 and tonumber(redis.call('GET', KEYS[8]) or '0') >= max_rate then
  return {'rate_limited'}
end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], 0, ARGV[1])
redis.call('ZADD', KEYS[3], 0, ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
redis.call('SADD', KEYS[5], ARGV[4])
redis.call('SADD', KEYS[6], ARGV[4])
redis.call('SADD', KEYS[7], ARGV[1])
redis.call('INCR', KEYS[8])
redis.call('EXPIRE', KEYS[8], ARGV[10])
if #KEYS == 10 then redis.call('SET', KEYS[10], ARGV[7], 'EX', ARGV[8]) end
redis.call('XADD', KEYS[9], 'MAXLEN', '~', ARGV[9], '*', 'job', ARGV[1])
return {'created'}
"""


def spec_digest(spec_json: str) -> str:
    return hashlib.sha256(spec_json.encode()).hexdigest()


@dataclass(frozen=True)
class Stored:
    """What a submission did: stored the job (`first_job_id` None), or found the job an
    earlier submission with the same idempotency key stored."""

    first_job_id: str | None = None


class Submissions:
    def __init__(self, client: Any, keys: Keys) -> None:
        self.keys = keys
        self._submit = client.register_script(_SUBMIT)

    def store(
        self,
        job: JobRecord,
        idempotency_key: str | None = None,
        max_open: int | None = None,
        max_per_minute: int | None = None,
    ) -> Stored:
        """Store and enqueue a new job, or find the one a known idempotency key stored.

        TooManyJobs when the tenant already has `max_open` jobs queued or running;
        RateLimited past `max_per_minute` submissions this clock minute; IdempotencyConflict
        when the key was used for another spec.
        """
        tenant, keys = job.tenant, self.keys
        spec_json = job.spec.model_dump_json()
        digest = spec_digest(spec_json)
        now = time.time()
        idem_keys = [keys.idempotency(tenant, idempotency_key)] if idempotency_key else []
        reply = self._submit(
            keys=[keys.job(job.id), keys.index(tenant), keys.state_index(tenant, job.state),
                  keys.tenant_queue(tenant), keys.waiting_tenants, keys.tenants,
                  keys.open_jobs(tenant), keys.submissions(tenant, int(now // 60)),
                  keys.changes, *idem_keys],
            args=[job.id, job.model_dump_json(), queue_score(job), tenant,
                  NO_LIMIT if max_open is None else max_open,
                  NO_LIMIT if max_per_minute is None else max_per_minute,
                  json.dumps({"job_id": job.id, "digest": digest}), IDEMPOTENCY_TTL_S,
                  CHANGES_MAXLEN, RATE_WINDOW_TTL_S],
        )  # fmt: skip
        outcome = _text(reply[0])
        if outcome == "created":
            return Stored()
        if outcome == "seen":
            first = json.loads(reply[1])
            if first["digest"] != digest:
                raise IdempotencyConflict(idempotency_key or "")
            return Stored(str(first["job_id"]))
        if outcome == "too_many":
            raise TooManyJobs(tenant, max_open or 0)
        assert outcome == "rate_limited", outcome
        raise RateLimited(tenant, max_per_minute or 0, retry_after_s=60 - int(now % 60))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value

"""JobReads: `GET /v1/jobs/{id}` on the event loop, through an asyncio Redis client.

The most frequent request of the API (clients poll it). Read with the sync JobStore, it made
one hop to the thread pool and back per request, a seventh of the API's CPU under a read load
(docs/benchmarks.md); here it is one pipelined round trip awaited on the loop, and the record
is built by the same function as JobStore.get's (shared.store.record_with_progress).
"""

from typing import Any

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from shared.jobs import JobRecord
from shared.redis_keys import Keys
from shared.store import record_with_progress

MAX_CONNECTIONS = 64  # per API process; a request past it waits for one (POOL_WAIT_S at most)
POOL_WAIT_S = 5.0


def connect_async(url: str, socket_timeout_s: float = 5.0) -> Any:
    """An asyncio Redis client that, as shared.store.connect's, fails fast while Redis is down
    (the API answers 503).

    A command that finds its pooled connection closed (Redis restarted) is sent once more on a
    new one: without an explicit Retry, redis-py's asyncio connections made from a URL retry
    nothing, and the first read on each dead connection was a 503 after Redis was back (seen
    in the e2e test of a Redis kill). Only a closed connection is retried, and once: redis-py
    retries the connection's handshake inside each retry of the command, so retrying timeouts
    too (its default) made a read of a hung Redis take 84 s instead of 5. The pool is bounded:
    async routes are not limited by a thread pool, and a stalled Redis must not collect one
    connection per waiting request.
    """
    once = Retry(ExponentialBackoff(cap=1.0, base=0.05), 1, (RedisConnectionError,))
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url, max_connections=MAX_CONNECTIONS, timeout=POOL_WAIT_S, decode_responses=True,
        socket_timeout=socket_timeout_s, socket_connect_timeout=2, health_check_interval=10,
        retry=once,
    )  # fmt: skip
    return redis.asyncio.Redis.from_pool(pool)


class JobReads:
    def __init__(self, url: str, keys: Keys) -> None:
        self.redis = connect_async(url)
        self.keys = keys

    async def get(self, job_id: str, tenant: str | None = None) -> JobRecord:
        """The job record with its live progress; another tenant's job is JobNotFound."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self.keys.job(job_id))
            pipe.hgetall(self.keys.progress(job_id))
            raw, progress = await pipe.execute()
        return record_with_progress(job_id, raw, progress, tenant)

    async def close(self) -> None:
        await self.redis.aclose()

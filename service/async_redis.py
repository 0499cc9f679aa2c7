"""connect_async: the API's asyncio Redis clients (status reads, the event hub)."""

from typing import Any

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

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

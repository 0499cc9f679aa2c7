"""One WATCH/MULTI retry loop for every optimistic transaction on Redis."""

from collections.abc import Callable
from typing import Any, TypeVar

import redis

T = TypeVar("T")
MAX_WATCH_RETRIES = 50


def transact(client: Any, watched: list[str], body: Callable[[Any], T], what: str) -> T:
    """Run `body(pipe)` with `watched` keys WATCHed until it commits without a conflict.

    `body` reads through `pipe`, then either calls `pipe.multi()` ... `pipe.execute()` or
    returns early (the pipeline is reset on the way out). Domain errors it raises pass through.
    """
    with client.pipeline() as pipe:
        for _ in range(MAX_WATCH_RETRIES):
            try:
                pipe.watch(*watched)
                return body(pipe)
            except redis.WatchError:
                continue
            finally:
                pipe.reset()
    raise RuntimeError(f"{what}: too much contention")

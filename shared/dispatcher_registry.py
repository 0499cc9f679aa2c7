"""Live dispatchers: each registers itself every few seconds with an expiry.

A hash holds each dispatcher's info and a sorted set its expiry, so listing the live ones is
one range read, never a scan of the keyspace (readiness probes call it often).
"""

import json
import time
from typing import Any

from shared.redis_keys import Keys


class DispatcherRegistry:
    def __init__(self, client: Any, keys: Keys) -> None:
        self.redis: Any = client
        self.keys = keys

    def register(self, dispatcher_id: str, info: dict[str, Any], ttl_s: float) -> None:
        expires_ms = int((time.time() + ttl_s) * 1000)
        with self.redis.pipeline() as pipe:
            pipe.hset(self.keys.dispatchers, dispatcher_id, json.dumps(info))
            pipe.zadd(self.keys.dispatchers_seen, {dispatcher_id: expires_ms})
            pipe.execute()

    def unregister(self, dispatcher_id: str) -> None:
        with self.redis.pipeline() as pipe:
            pipe.hdel(self.keys.dispatchers, dispatcher_id)
            pipe.zrem(self.keys.dispatchers_seen, dispatcher_id)
            pipe.execute()

    def live_count(self) -> int:
        return int(self.redis.zcount(self.keys.dispatchers_seen, int(time.time() * 1000), "+inf"))

    def live(self) -> list[dict[str, Any]]:
        """Info of the dispatchers whose registration has not expired; expired ones are dropped."""
        now_ms = int(time.time() * 1000)
        expired = self.redis.zrangebyscore(self.keys.dispatchers_seen, "-inf", now_ms)
        if expired:
            self.redis.hdel(self.keys.dispatchers, *expired)
            self.redis.zrem(self.keys.dispatchers_seen, *expired)
        ids = self.redis.zrangebyscore(self.keys.dispatchers_seen, now_ms, "+inf")
        values = self.redis.hmget(self.keys.dispatchers, ids) if ids else []
        return [json.loads(v) for v in values if v is not None]

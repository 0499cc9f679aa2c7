"""API keys in Redis: bearer keys of tenants, stored as sha256 digests only (shared/apikeys.py).

    apikey:<digest>   hash {key_id, tenant, max_priority}: the lookup of every request
    apikeyid:<key id> hash {tenant, digest, created_at, revoked_at, max_priority}
    apikeys           sorted set of key ids by creation time
"""

from dataclasses import dataclass
from typing import Any

from shared import apikeys
from shared.redis_keys import Keys
from shared.transactions import transact

MAX_PRIORITY = 9


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the tenant of its key and what the key allows."""

    tenant: str
    max_priority: int = MAX_PRIORITY
    key_id: str | None = None


class ApiKeyStore:
    def __init__(self, client: Any, keys: Keys) -> None:
        self.redis: Any = client
        self.keys = keys

    def create(self, tenant: str, max_priority: int = MAX_PRIORITY) -> tuple[str, str]:
        """A new key of `tenant`: (key id, key). The key is shown once; only its digest stays.

        Jobs submitted with the key may ask for a priority of at most `max_priority`.
        """
        apikeys.check_tenant(tenant)
        if not 0 <= max_priority <= MAX_PRIORITY:
            raise ValueError(f"max_priority {max_priority}: use 0..{MAX_PRIORITY}")
        key_id, key = apikeys.new_key()
        key_digest = apikeys.digest(key)
        created_at = apikeys.now_iso()
        with self.redis.pipeline() as pipe:  # MULTI: a key is usable only once it is listed
            pipe.hset(self.keys.api_key(key_digest), mapping={
                "key_id": key_id, "tenant": tenant, "max_priority": max_priority})  # fmt: skip
            pipe.hset(
                self.keys.api_key_id(key_id),
                mapping={"tenant": tenant, "digest": key_digest, "created_at": created_at,
                         "max_priority": max_priority},  # fmt: skip
            )
            seconds, micros = self.redis.time()  # one clock for every API process
            pipe.zadd(self.keys.api_keys, {key_id: seconds * 1_000_000 + micros})
            pipe.execute()
        return key_id, key

    def caller(self, key: str) -> Caller | None:
        """The caller of a live key; None for an unknown, revoked or malformed one."""
        if not apikeys.looks_like_key(key):
            return None
        entry = self.redis.hgetall(self.keys.api_key(apikeys.digest(key)))
        if not entry:
            return None
        return Caller(entry["tenant"], int(entry.get("max_priority", MAX_PRIORITY)),
                      entry["key_id"])  # fmt: skip

    def tenant_for_key(self, key: str) -> str | None:
        caller = self.caller(key)
        return caller.tenant if caller else None

    def is_live(self, key_id: str) -> bool:
        entry = self.redis.hget(self.keys.api_key_id(key_id), "revoked_at")
        return entry is None and bool(self.redis.exists(self.keys.api_key_id(key_id)))

    def revoke(self, key_id: str) -> bool:
        """Revoke a key by its id at once; False if there is no live key with that id."""
        id_key = self.keys.api_key_id(key_id)

        def body(pipe: Any) -> bool:
            entry = pipe.hgetall(id_key)
            if not entry or entry.get("revoked_at"):
                return False
            pipe.multi()
            pipe.delete(self.keys.api_key(entry["digest"]))
            pipe.hset(id_key, "revoked_at", apikeys.now_iso())
            pipe.execute()
            return True

        return transact(self.redis, [id_key], body, f"revoke of API key {key_id}")

    def list(self, tenant: str | None = None) -> list[dict[str, str | None]]:
        """Keys oldest first (of one tenant, or all), revoked ones included; never a secret.

        Each is {key_id, tenant, created_at, revoked_at, max_priority}; revoked_at is None while
        the key is live.
        """
        infos: list[dict[str, str | None]] = []
        for key_id in self.redis.zrange(self.keys.api_keys, 0, -1):
            entry = self.redis.hgetall(self.keys.api_key_id(key_id))
            if not entry or (tenant is not None and entry["tenant"] != tenant):
                continue
            infos.append(
                {
                    "key_id": key_id,
                    "tenant": entry["tenant"],
                    "created_at": entry["created_at"],
                    "revoked_at": entry.get("revoked_at"),
                    "max_priority": entry.get("max_priority", str(MAX_PRIORITY)),
                }
            )
        return infos

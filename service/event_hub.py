"""EventHub: one Redis reader per API process that wakes the open event streams of jobs.

Every write of a job record is announced on the `changes` stream, and every finished epoch is
added to the job's `metrics` stream. The hub blocks on both (XREAD BLOCK, on its own connection)
for the jobs that open streams follow, and sets their events; a stream reads its job only when
woken. An idle stream so costs Redis nothing: a process makes one XREAD a second however many
streams it holds (and none while it holds none), one EXISTS of its callers' keys every 2 s (a
revoked key's streams close) and one refresh of its stream slots per tenant every 10 s.
Before, each stream polled Redis through the thread pool 4 times a second: 300 streams of one
tenant made /healthz wait 11.7 s for a thread.

Open streams per tenant are counted across API processes in `event_streams:<tenant>`, a sorted
set of stream ids scored by expiry: each process refreshes the entries of its own streams, so
those of a crashed process lapse within SLOT_TTL_S.
"""

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio

from service.async_redis import connect_async
from shared.errors import TooManyStreams
from shared.redis_keys import Keys

log = logging.getLogger("aetrain.events")

BLOCK_MS = 1000  # a newly followed job's metrics wake its streams after at most this long
READ_COUNT = 1000
KEY_CHECK_S = 2.0
SLOT_TTL_S = 30.0
SLOT_REFRESH_S = 10.0
STOP_STEP_S = 5.0
FOLLOW_WAIT_S = 10.0  # a follow that the hub cannot start reading for fails as a Redis error

# KEYS: a tenant's open streams. ARGV: stream id, limit, ttl_ms. Redis's clock, so that every
# API process agrees on what has expired.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS: a tenant's open streams. ARGV: ttl_ms, then stream ids. XX: a stream released (or lapsed)
# meanwhile is not brought back.
_REFRESH = """
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for first = 2, #ARGV, 500 do
  local pairs = {}
  for i = first, math.min(first + 499, #ARGV) do
    pairs[#pairs + 1] = expiry
    pairs[#pairs + 1] = ARGV[i]
  end
  redis.call('ZADD', KEYS[1], 'XX', unpack(pairs))
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""


@dataclass(eq=False)
class Watch:
    """One open event stream: the job it follows, its slot, and the event that wakes it."""

    job_id: str
    tenant: str
    slot: str
    api_key: str | None  # the Redis key of the caller's API key (None with auth off)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    revoked: bool = False

    async def wait(self, timeout_s: float) -> bool:
        """True once woken (the job changed, or the key was revoked); False after `timeout_s`."""
        try:
            async with asyncio.timeout(timeout_s):
                await self.changed.wait()
        except TimeoutError:
            return False
        return True


class EventHub:
    """The process's one reader of job changes; routes open, follow and close watches on it."""

    def __init__(self, url: str, keys: Keys) -> None:
        # Its own connections: one blocks in XREAD; slots and keys are checked on another.
        self.redis: Any = connect_async(url, socket_timeout_s=BLOCK_MS / 1000 + 10)
        self.keys = keys
        self._watches: dict[str, set[Watch]] = {}  # job id -> its open streams
        self._metrics_after: dict[str, str] = {}  # job id -> last metrics entry the hub saw
        self._changes_after = "0-0"
        self._reading = asyncio.Event()  # set once the hub knows where `changes` ends
        self._wanted = asyncio.Event()  # set by a follow: an idle hub starts reading again
        self._following = 0  # follows under way (not yet among the watches)
        self._task: asyncio.Task[None] | None = None
        self._releases: set[asyncio.Task[None]] = set()
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._refresh = self.redis.register_script(_REFRESH)

    async def start(self) -> None:
        """Start reading (in a task: the API starts while Redis is still down)."""
        self._task = asyncio.create_task(self._run(), name="aetrain-event-hub")

    async def stop(self) -> None:
        """Stop reading, finish the slot releases under way, close the connections.

        Each step gets STOP_STEP_S at most: a shutdown must never hang on Redis (a CI run once
        waited 275 s in an app's shutdown). What is left over lapses in Redis by itself.
        """
        if self._task is not None:
            self._task.cancel()
            await _within(STOP_STEP_S, "the reader", self._task)
        if self._releases:
            await _within(STOP_STEP_S, "slot releases", *self._releases)
        closing = asyncio.get_running_loop().create_task(self.redis.aclose())
        await _within(STOP_STEP_S, "closing the connections", closing)

    # -- streams ------------------------------------------------------------------------------
    async def open(self, job_id: str, tenant: str, limit: int, api_key: str | None) -> Watch:
        """Take one of the tenant's `limit` stream slots (TooManyStreams when none is free).

        The watch wakes nothing until `follow`; a slot never followed lapses after SLOT_TTL_S.
        """
        slot = uuid.uuid4().hex
        acquired = await self._acquire(
            keys=[self.keys.event_streams(tenant)], args=[slot, limit, int(SLOT_TTL_S * 1000)]
        )
        if not acquired:
            raise TooManyStreams(tenant, limit)
        return Watch(job_id, tenant, slot, api_key)

    async def follow(self, watch: Watch) -> None:
        """Wake `watch` on every change of its job from now on; read the job after this."""
        self._following += 1  # the hub does not go idle while this is under way
        try:
            self._wanted.set()
            try:  # an idle hub reads where `changes` ends first: Redis may be down meanwhile
                async with asyncio.timeout(FOLLOW_WAIT_S):
                    await self._reading.wait()
            except TimeoutError:
                raise redis.ConnectionError("the event hub cannot read Redis") from None
            if watch.job_id not in self._metrics_after:
                after = await self._last_id(self.keys.metrics(watch.job_id))
                self._metrics_after.setdefault(watch.job_id, after)  # an older one is safe
            self._watches.setdefault(watch.job_id, set()).add(watch)
        finally:
            self._following -= 1

    def close(self, watch: Watch) -> None:
        """Stop waking `watch` and release its slot (sync: it runs in a cancelled stream)."""
        watches = self._watches.get(watch.job_id, set())
        watches.discard(watch)
        if not watches:
            self._watches.pop(watch.job_id, None)
            self._metrics_after.pop(watch.job_id, None)
        # A task of its own: the stream's task may be cancelled, and would cancel the ZREM.
        try:
            task = asyncio.get_running_loop().create_task(self._release(watch))
        except RuntimeError:  # no loop left (the process is ending): the slot lapses
            return
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, watch: Watch) -> None:
        try:
            await self.redis.zrem(self.keys.event_streams(watch.tenant), watch.slot)
        except redis.RedisError as exc:  # the slot lapses after SLOT_TTL_S anyway
            log.warning("could not release an event stream slot of %s: %s", watch.tenant, exc)

    # -- the reader ---------------------------------------------------------------------------
    async def _run(self) -> None:
        next_key_check = next_refresh = time.monotonic()
        while True:
            try:
                if not self._watches and not self._following:
                    await self._idle()
                if not self._reading.is_set():
                    self._changes_after = await self._last_id(self.keys.changes)
                    self._reading.set()
                block_s = min(next_key_check, next_refresh) - time.monotonic()
                await self._read(block_ms=max(1, min(BLOCK_MS, int(block_s * 1000))))
                now = time.monotonic()
                if now >= next_key_check:
                    next_key_check = now + KEY_CHECK_S
                    await self._check_keys()
                if now >= next_refresh:
                    next_refresh = now + SLOT_REFRESH_S
                    await self._refresh_slots()
            except redis.RedisError as exc:
                log.warning("event hub: Redis failed (%s); retrying in 1 s", exc)
                await asyncio.sleep(1.0)
            except Exception:  # the hub must outlive any one failure, or every stream goes deaf
                log.exception("event hub: unexpected failure; retrying in 1 s")
                await asyncio.sleep(1.0)

    async def _idle(self) -> None:
        """With no stream open, read nothing until one follows a job: every submission and
        state change is an entry of `changes`, and each API process read them all (8% of a
        worker's CPU under a submission load) for streams nobody had open."""
        self._reading.clear()
        self._wanted.clear()
        await self._wanted.wait()

    async def _read(self, block_ms: int) -> None:
        metrics_keys = {self.keys.metrics(job_id): job_id for job_id in self._metrics_after}
        streams = {self.keys.changes: self._changes_after}
        streams.update({key: self._metrics_after[job] for key, job in metrics_keys.items()})
        replies = await self.redis.xread(streams, count=READ_COUNT, block=block_ms)
        for stream, entries in replies or []:
            if not entries:
                continue
            last_id = entries[-1][0]
            if stream == self.keys.changes:
                self._changes_after = last_id
                for job_id in {fields.get("job") for _, fields in entries}:
                    self._wake(job_id)
            elif (job_id := metrics_keys[stream]) in self._metrics_after:
                self._metrics_after[job_id] = last_id
                self._wake(job_id)

    def _wake(self, job_id: str | None) -> None:
        for watch in self._watches.get(job_id or "", ()):
            watch.changed.set()

    async def _check_keys(self) -> None:
        """Close the streams of revoked keys: one EXISTS over every caller's key."""
        api_keys = sorted({w.api_key for ws in self._watches.values() for w in ws if w.api_key})
        if not api_keys or await self.redis.exists(*api_keys) == len(api_keys):
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for api_key in api_keys:
                pipe.exists(api_key)
            live = await pipe.execute()
        gone = {k for k, alive in zip(api_keys, live, strict=True) if not alive}
        for watches in self._watches.values():
            for watch in watches:
                if watch.api_key in gone:
                    watch.revoked = True
                    watch.changed.set()

    async def _refresh_slots(self) -> None:
        slots: dict[str, list[str]] = {}
        for watches in self._watches.values():
            for watch in watches:
                slots.setdefault(watch.tenant, []).append(watch.slot)
        for tenant, ids in slots.items():
            await self._refresh(
                keys=[self.keys.event_streams(tenant)], args=[int(SLOT_TTL_S * 1000), *ids]
            )

    async def _last_id(self, stream: str) -> str:
        last = await self.redis.xrevrange(stream, "+", "-", count=1)
        return str(last[0][0]) if last else "0-0"


async def _within(seconds: float, what: str, *tasks: "asyncio.Future[Any]") -> None:
    """Wait for `tasks` at most `seconds` (never cancelling and waiting again); log what is left."""
    _, pending = await asyncio.wait(tasks, timeout=seconds)
    if pending:
        log.warning("event hub: %s did not finish within %.0f s at shutdown", what, seconds)

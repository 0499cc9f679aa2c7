"""Limits of GET /v1/jobs/{id}/events, on a real uvicorn and Redis: a tenant's cap on open
streams (counted in Redis, freed when a stream ends), a revoked key's stream closes, and idle
streams cost neither the API's threads nor Redis calls."""

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import httpx
import pytest
import redis

from service import event_hub
from service.app import create_app
from service.event_hub import EventHub, Watch
from shared.jobs import JobRecord
from shared.redis_keys import Keys
from shared.settings import Settings
from shared.specs import parse_job_spec
from shared.store import JobStore
from tests.conftest import free_port
from tests.service.helpers import serve
from tests.specs import digits_spec

pytestmark = pytest.mark.timeout(120)

# Below the 15 s keepalive: a stream that should have closed fails the read instead of hanging.
READ_TIMEOUT_S = 12.0


@dataclass
class Stream:
    """An event stream held open after its first event, so the server counts it."""

    response: httpx.Response
    lines: Iterator[str]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def submit(store: JobStore, tenant: str) -> str:
    job, _ = store.submit(JobRecord.for_spec(parse_job_spec(digits_spec()), tenant=tenant))
    return job.id


class Streams(ExitStack):
    """Event streams held open until the block ends, each read to its first event, so that the
    server counts it. A stream's line iterator is kept too: dropping it closes the connection."""

    def __init__(self, http: httpx.Client) -> None:
        super().__init__()
        self.http = http
        self.held: list[Stream] = []

    def open(self, job_id: str, key: str) -> Stream:
        response = self.enter_context(
            self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=bearer(key))
        )
        assert response.status_code == 200, response.read()
        lines = response.iter_lines()
        assert next(lines) == "event: state"
        while next(lines):  # to the blank line that ends the first event
            pass
        self.held.append(Stream(response, lines))
        return self.held[-1]


def open_slots(store: JobStore, tenant: str) -> int:
    return int(store.redis.zcard(store.keys.event_streams(tenant)))


def wait_until(predicate: Callable[[], bool], what: str, limit_s: float = 20.0) -> None:
    """Poll for something the server does after a client has gone (a liveness bound)."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


def redis_calls(store: JobStore) -> int:
    """Commands Redis has run, but for the INFO calls that count them."""
    stats = store.redis.info("commandstats")
    return sum(int(s["calls"]) for name, s in stats.items() if name != "cmdstat_info")


def redis_calls_per_s(store: JobStore, window_s: float = 3.0) -> float:
    before, start = redis_calls(store), time.monotonic()
    time.sleep(window_s)
    return (redis_calls(store) - before) / (time.monotonic() - start)


@pytest.fixture
def http_client() -> Callable[[str], httpx.Client]:
    def make(base_url: str) -> httpx.Client:
        return httpx.Client(
            base_url=base_url,
            timeout=httpx.Timeout(5.0, read=READ_TIMEOUT_S),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        )

    return make


@pytest.fixture
def capped(settings: Settings, store: JobStore) -> Settings:
    return settings.model_copy(update={"auth": "on", "max_event_streams": 2})


def test_a_tenant_past_its_stream_cap_gets_429_while_another_tenant_streams(
    capped: Settings, store: JobStore, http_client: Callable[[str], httpx.Client]
) -> None:
    _, alice = store.api_keys.create("alice")
    _, bob = store.api_keys.create("bob")
    alice_job, bob_job = submit(store, "alice"), submit(store, "bob")
    with serve(create_app(capped)) as base, http_client(base) as http, Streams(http) as streams:
        first = streams.open(alice_job, alice)
        streams.open(alice_job, alice)

        refused = http.get(f"/v1/jobs/{alice_job}/events", headers=bearer(alice))
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) > 0
        assert "event streams open" in refused.json()["detail"]
        streams.open(bob_job, bob)  # another tenant is not held back
        streams.open(bob_job, bob)
        assert (open_slots(store, "alice"), open_slots(store, "bob")) == (2, 2)

        first.response.close()  # the client goes away: the server frees the slot
        wait_until(lambda: open_slots(store, "alice") == 1, "the closed stream's slot freed")
        streams.open(alice_job, alice)
    wait_until(lambda: open_slots(store, "alice") + open_slots(store, "bob") == 0, "all freed")


def test_the_slots_of_a_crashed_api_process_lapse(
    capped: Settings, store: JobStore, http_client: Callable[[str], httpx.Client]
) -> None:
    _, alice = store.api_keys.create("alice")
    job_id = submit(store, "alice")
    # Entries whose expiry (ms since 1970) is long past: left by a process that died.
    store.redis.zadd(store.keys.event_streams("alice"), {"dead-1": 1, "dead-2": 2})
    with serve(create_app(capped)) as base, http_client(base) as http, Streams(http) as streams:
        streams.open(job_id, alice)
        streams.open(job_id, alice)
        assert http.get(f"/v1/jobs/{job_id}/events", headers=bearer(alice)).status_code == 429


def test_a_revoked_keys_open_stream_closes_and_frees_its_slot(
    capped: Settings, store: JobStore, http_client: Callable[[str], httpx.Client]
) -> None:
    key_id, key = store.api_keys.create("alice")
    _, other_key = store.api_keys.create("alice")
    job_id = submit(store, "alice")
    with serve(create_app(capped)) as base, http_client(base) as http, Streams(http) as streams:
        revoked = streams.open(job_id, key)
        streams.open(job_id, other_key)  # stays open: the other key is live
        assert store.api_keys.revoke(key_id)

        rest = list(revoked.lines)  # ends when the server closes the stream (else: read timeout)
        assert "event: end" not in rest
        wait_until(lambda: open_slots(store, "alice") == 1, "the revoked stream's slot freed")
        events = f"/v1/jobs/{job_id}/events"
        assert http.get(events, headers=bearer(key)).status_code == 401
        streams.open(job_id, other_key)  # the revoked stream's slot is free again; the live
        assert http.get(events, headers=bearer(other_key)).status_code == 429  # key's is held


def test_forty_idle_streams_stall_neither_the_api_nor_add_redis_calls(
    settings: Settings, store: JobStore, http_client: Callable[[str], httpx.Client]
) -> None:
    many = settings.model_copy(update={"auth": "on", "max_event_streams": 10})
    keys = [store.api_keys.create(f"tenant-{i}")[1] for i in range(4)]
    jobs = [submit(store, f"tenant-{i}") for i in range(4)]
    with serve(create_app(many)) as base, http_client(base) as http, Streams(http) as streams:
        streams.open(jobs[0], keys[0])
        one = redis_calls_per_s(store)
        for i in range(1, 40):
            streams.open(jobs[i % 4], keys[i % 4])
        forty = redis_calls_per_s(store)

        assert http.get("/healthz").status_code == 200
        job = http.get(f"/v1/jobs/{jobs[0]}", headers=bearer(keys[0]))
        assert job.status_code == 200 and job.json()["state"] == "queued"
        # Polling streams made about 6 calls a second each (240 for 40); the hub makes one XREAD
        # a second, one EXISTS of the keys every 2 s and a slot refresh per tenant every 10 s.
        assert forty <= one + 10, f"{one:.1f} Redis calls/s with 1 stream, {forty:.1f} with 40"


def xreads(store: JobStore) -> int:
    return int(store.redis.info("commandstats").get("cmdstat_xread", {}).get("calls", 0))


def test_an_api_without_open_streams_reads_no_changes_and_a_later_stream_still_wakes(
    settings: Settings, store: JobStore, http_client: Callable[[str], httpx.Client]
) -> None:
    job = submit(store, "default")
    with serve(create_app(settings)) as base, http_client(base) as http:
        before = xreads(store)
        for _ in range(20):  # each one an entry of the changes stream
            submit(store, "default")
        time.sleep(2.5)  # the hub blocked in XREAD for up to 1 s at a time while it read
        assert xreads(store) == before
        with Streams(http) as streams:
            stream = streams.open(job, "unused with auth off")
            store.request_cancel(job)
            events = []
            for line in stream.lines:  # a change made after the stream opened wakes it
                events.append(line)
                if line.startswith("data:") and '"cancelled"' in line:
                    break
            assert any('"cancelled"' in line for line in events)
        assert xreads(store) > before


def test_a_follow_while_redis_is_down_fails_as_a_redis_error_instead_of_waiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hub went idle (no stream open); a stream then follows a job while Redis is down:
    the follow fails (the stream ends, the client retries) rather than wait in silence."""
    monkeypatch.setattr(event_hub, "FOLLOW_WAIT_S", 0.5)
    nothing_listens = f"redis://127.0.0.1:{free_port()}/0"

    async def follow() -> float:
        hub = EventHub(nothing_listens, Keys("down"))
        await hub.start()
        try:
            started = time.monotonic()
            with pytest.raises(redis.ConnectionError):
                await hub.follow(Watch("j1", "alice", "slot", None))
            return time.monotonic() - started
        finally:
            await hub.stop()

    assert asyncio.run(follow()) < 5.0

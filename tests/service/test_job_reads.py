"""JobReads (GET /v1/jobs/{id} on the event loop) and its asyncio client: the first read after
a Redis restart answers, as the sync store's does; a hung Redis is one timeout, not a storm."""

import asyncio
import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from service.async_redis import connect_async
from service.job_reads import JobReads
from shared.errors import JobNotFound
from shared.jobs import JobRecord
from shared.specs import parse_job_spec
from shared.store import JobStore, connect
from tests.conftest import free_port, wait_for_ping
from tests.specs import digits_spec

pytestmark = pytest.mark.timeout(60)


class PrivateRedis:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for_ping(self.url)
        return process

    def restart(self) -> None:
        self.process.kill()
        self.process.wait()
        self.process = self._start()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    try:
        yield server
    finally:
        server.process.kill()
        server.process.wait()


def test_the_first_read_after_a_redis_restart_answers(private_redis: PrivateRedis) -> None:
    store = JobStore(connect(private_redis.url), "reads")
    spec = parse_job_spec(digits_spec())

    async def scenario() -> None:
        reads = JobReads(private_redis.url, store.keys)
        try:
            job, _ = store.submit(JobRecord.for_spec(spec, "alice"))
            # Several pooled connections, as under concurrent requests.
            first = await asyncio.gather(*(reads.get(job.id, "alice") for _ in range(4)))
            assert {read.id for read in first} == {job.id}
            with pytest.raises(JobNotFound):  # another tenant's job: the same as none
                await reads.get(job.id, "bob")
            private_redis.restart()  # every pooled connection is now dead; the data is gone
            again, _ = store.submit(JobRecord.for_spec(spec, "alice"))
            after = await asyncio.gather(*(reads.get(again.id, "alice") for _ in range(4)))
            assert {read.id for read in after} == {again.id}
        finally:
            await reads.close()

    try:
        asyncio.run(scenario())
    finally:
        store.redis.close()


def test_a_hung_redis_is_one_timeout_on_one_connection_not_a_retry_storm() -> None:
    """A Redis that takes connections and never answers (SIGSTOPped, a VM pause): a read gives
    up after its socket timeout, as the sync store's does; retrying timeouts (redis-py's
    default), with the handshake retried inside each retry, made it 16 connections and 84 s."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                accepted.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()

    async def read() -> float:
        client = connect_async(f"redis://127.0.0.1:{listener.getsockname()[1]}", 0.3)
        started = time.monotonic()
        try:
            with pytest.raises(redis.TimeoutError):
                await client.get("anything")
            return time.monotonic() - started
        finally:
            await client.aclose()

    try:
        elapsed = asyncio.run(read())
    finally:
        listener.close()
        for conn in accepted:
            conn.close()
    assert len(accepted) == 1
    assert elapsed < 3.0  # 0.3 s, and the pool's checks; not 16 times over

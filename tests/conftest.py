"""Real parts for the tests: a redis-server on a free port and one local Ray per session."""

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from shared.settings import Settings
from shared.storage import Storage
from shared.store import JobStore, connect

if TYPE_CHECKING:
    from workers.group_pool import GroupPool


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_ping(url: str, timeout_s: float = 10.0) -> str:
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if client.ping():
                return url
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError(f"redis at {url} did not answer")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield wait_for_ping(f"redis://127.0.0.1:{port}/0")
    finally:
        proc.terminate()
        proc.wait()


@pytest.fixture
def store(redis_url: str) -> Iterator[JobStore]:
    client = connect(redis_url)
    # Everything but the channels of the session's warm groups (see shared_pool).
    channels = JobStore(client, "aetrain").keys.group("")
    stale = [key for key in client.scan_iter(count=1000) if not key.startswith(channels)]
    for start in range(0, len(stale), 1000):
        client.delete(*stale[start : start + 1000])
    yield JobStore(client, "aetrain")
    client.close()


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return Storage(str(tmp_path / "storage"))


@pytest.fixture
def settings(redis_url: str, storage: Storage, tmp_path: Path) -> Settings:
    # Starlette's TestClient sends `Host: testserver`, which the local (auth off) API refuses
    # unless it is allowed, as a real deployment would allow its own name.
    return Settings(
        home=tmp_path / "home", storage=str(storage.root), redis_url=redis_url, auth="off",
        allowed_hosts="testserver",
    )  # fmt: skip


@pytest.fixture
def auth_settings(settings: Settings) -> Settings:
    """The test settings with API keys on (as `aetrain api` and deploy/ run)."""
    return settings.model_copy(update={"auth": "on"})


@pytest.fixture
def client(settings: Settings, store: JobStore) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """One local Ray for the whole session (it takes seconds to start on 2 cores)."""
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def shared_pool(redis_url: str, ray_address: str) -> Iterator["GroupPool"]:
    """Warm worker groups shared by the dispatchers of one test module, as a dispatcher keeps
    its own.

    A group takes ~10 s to start here; most tests need one that has trained something
    before, not a new one. A lapsed hold (each test empties Redis) is taken again. Closed
    with the module, so no other module finds its groups' keys or holds in Redis.
    """
    from workers.group_pool import GroupPool, PoolSettings  # Ray: only for the tests on it

    pool = GroupPool(JobStore(connect(redis_url), "aetrain"), "tests",
                     PoolSettings(redis_url, ray_address, idle_s=3600.0)).start()  # fmt: skip
    yield pool
    pool.close()


@pytest.fixture
def group_pool(shared_pool: "GroupPool") -> "GroupPool":
    return shared_pool


@pytest.fixture
def empty_group_pool(shared_pool: "GroupPool") -> "GroupPool":
    """The shared pool without idle groups: for a test that counts or kills worker processes
    (Ray ends a retired group's workers a moment after its driver)."""
    shared_pool.retire_idle()
    deadline = time.monotonic() + 30
    while any("RayTrainWorker" in line for line in _processes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return shared_pool


def _processes() -> list[str]:
    return subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()

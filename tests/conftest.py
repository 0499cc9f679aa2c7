"""Real parts for the tests: a redis-server on a free port and one local Ray per session."""

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from shared.settings import Settings
from shared.storage import Storage
from shared.store import JobStore, connect


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
    client.flushdb()
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

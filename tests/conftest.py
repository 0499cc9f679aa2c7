"""Real parts for the tests: a redis-server on a free port and one local Ray per session."""

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from shared.settings import Settings
from shared.storage import LocalStorage
from shared.store import JobStore, connect

if TYPE_CHECKING:
    from workers.group_pool import GroupPool


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children in their own sessions too)."""
    out = subprocess.run(["ps", "-eo", "pid,ppid"], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines()[1:]:
        child, parent = (int(v) for v in line.split())
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def train_worker_pids(actor: bytes = b"RayTrainWorker") -> list[int]:
    """This test process's Ray Train workers (or other actors of that class name): those of
    its own Ray (the suite runs on several processes, each with a Ray of its own), in the
    order they were started."""
    pids = []
    for pid in sorted(descendants(os.getpid())):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:  # ended meanwhile
            continue
        if actor in args:
            pids.append(pid)
    return pids


def pytest_configure(config: pytest.Config) -> None:
    """Ray's token for local clusters (~/.ray/auth_token) is written by the first `ray.init`
    that finds none; the suite's processes would race to write it on a fresh machine, and a
    cluster whose token was overwritten refuses its clients. Written once, up front."""
    if hasattr(config, "workerinput"):  # an xdist worker: the controller has done it
        return
    if not (Path.home() / ".ray" / "auth_token").exists():
        ray_cli = Path(sys.executable).parent / "ray"
        subprocess.run([ray_cli, "get-auth-token", "--generate"], check=True, capture_output=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules on Ray first (the long ones), so the quick ones fill in at the end and the
    suite's processes finish together."""
    items.sort(key=lambda item: item.get_closest_marker("ray") is None)


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
    store = JobStore(client, "aetrain")
    stale = data_keys(store)  # the channels of the session's warm groups stay (shared_pool)
    for start in range(0, len(stale), 1000):
        client.delete(*stale[start : start + 1000])
    yield store
    client.close()


def data_keys(store: JobStore) -> list[str]:
    """Every key but the channels of warm groups (which live with the session's pool)."""
    channels = store.keys.group("")
    return [key for key in store.redis.scan_iter(count=1000) if not key.startswith(channels)]


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(str(tmp_path / "storage"))


@pytest.fixture
def settings(redis_url: str, storage: LocalStorage, tmp_path: Path) -> Settings:
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


S3_BUCKET = "aetrain-tests"


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 API on loopback (moto's server, a process of its own, as redis-server is),
    named by the AWS variables of this process, which the groups' ranks get from the
    dispatcher (LaunchRequest.env)."""
    from pyarrow import fs

    port = free_port()
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    with open(log, "wb") as out:
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "aetrain-test",
           "AWS_SECRET_ACCESS_KEY": "aetrain-test", "AWS_REGION": "us-east-1"}  # fmt: skip
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's S3 server did not start; see {log}") from None
                time.sleep(0.1)
        admin = fs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                                region="us-east-1", allow_bucket_creation=True)  # fmt: skip
        admin.create_dir(S3_BUCKET)
        yield endpoint
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def s3_url(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    """A prefix of the test bucket of its own for each test."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name[:40])
    return f"s3://{S3_BUCKET}/{name}-{os.urandom(4).hex()}"


@pytest.fixture(scope="session")
def ray_address(s3_endpoint: str) -> Iterator[str]:
    """One local Ray for the whole session (it takes seconds to start on 2 cores).

    The S3 server's variables are set first: a warm group's ranks get the AWS settings its
    driver had when it started (workers/warm_group.py), and the session's groups outlive
    the test that started them. A group started before them served a later test's job in
    the bucket with AWS's own endpoint (a CI failure)."""
    import ray

    from workers.main import quiet_local_ray

    quiet_local_ray()
    # A node that dies is seen dead in ~5 s rather than Ray's 15 (tests/e2e/test_two_nodes.py).
    health = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _system_config=health)  # fmt: skip
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def shared_pool(redis_url: str, ray_address: str) -> Iterator["GroupPool"]:
    """Warm worker groups shared by the dispatchers of the session's tests, as a dispatcher
    keeps its own.

    A group costs ~12 CPU-s to start on 2 cores, the largest fixed cost of the suite; most
    tests need one that has trained something before, not a new one, so the pool lives as
    long as the session's Ray. A lapsed hold (each test empties Redis) is taken again.
    """
    from workers.group_pool import GroupPool, PoolSettings  # Ray: only for the tests on it

    pool = GroupPool(JobStore(connect(redis_url), "aetrain"), "tests",
                     PoolSettings(redis_url, ray_address, idle_s=3600.0)).start()  # fmt: skip
    _POOLS.append(pool)
    yield pool
    pool.close()


_POOLS: list["GroupPool"] = []


@pytest.fixture(autouse=True)
def _warm_groups_only_for_ray_tests(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test off Ray finds no warm group: their holds would take room in the scheduler it
    tests, and their idle ranks' reads would count in the Redis it measures. The Ray modules
    run first in each process, so the groups are not needed again; a Ray test after this
    starts the pool again.

    After a Ray test, at most one idle 1-worker group stays: the one most tests can use. An
    idle group costs ~5% of a core and holds its CPUs; those a test left (two at once, two
    workers wide) would otherwise idle on through the rest of the session."""
    if request.node.get_closest_marker("ray") is None:
        for pool in _POOLS:
            pool.close()
        yield
        return
    yield
    for pool in _POOLS:
        _keep_one_idle_group(pool)


def _keep_one_idle_group(pool: "GroupPool") -> None:
    from workers.group_pool import DEFAULT_SHAPE

    keep = next((g for g in pool.groups.values()
                 if g.shape == DEFAULT_SHAPE and g.alive and not g.busy), None)  # fmt: skip
    pool.retire_idle(keep=keep)


@pytest.fixture
def group_pool(shared_pool: "GroupPool") -> "GroupPool":
    return shared_pool


def _settle(pool: "GroupPool") -> None:
    """Wait until this process's Ray runs the workers of the pool's groups and no others
    (Ray ends a retired group's workers a moment after its driver)."""
    deadline = time.monotonic() + 30
    while len(train_worker_pids()) > sum(g.shape.workers for g in pool.groups.values()):
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)


@pytest.fixture
def empty_group_pool(shared_pool: "GroupPool") -> "GroupPool":
    """The shared pool without idle groups: for a test that needs every CPU of the cluster
    for dispatchers of its own, or counts all worker processes."""
    shared_pool.retire_idle()
    _settle(shared_pool)
    return shared_pool


@pytest.fixture
def one_group_pool(shared_pool: "GroupPool") -> "GroupPool":
    """The shared pool with at most one idle group, of one worker: for a test that counts
    or kills the workers of the stage it runs, without paying for a new group when an
    earlier test left one warm."""
    _keep_one_idle_group(shared_pool)
    _settle(shared_pool)
    return shared_pool

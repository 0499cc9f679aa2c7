"""`aetrain api --workers 2` on a real Redis: two processes serve one port, `/metrics` and the
metrics port show the requests of both, and a killed supervisor takes its workers along;
metric folders of dead supervisors are removed."""

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from service.api_workers import FOLDER_PREFIX, remove_orphaned_folders
from tests.conftest import descendants, free_port
from tests.service.test_metrics_endpoint import LATENCY, scrape, value
from tests.specs import digits_spec

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
READS = 60


@dataclass
class Api:
    process: subprocess.Popen[bytes]
    url: str
    metrics_url: str


def wait_until_ready(api: Api, log: Path, timeout_s: float = 60) -> None:
    """Until both workers have started their app (one answering is not enough)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert api.process.poll() is None, log.read_text()
        if log.read_text().count("Application startup complete") == 2:
            assert httpx.get(f"{api.url}/healthz", timeout=5).status_code == 200
            return
        time.sleep(0.2)
    raise AssertionError(f"aetrain api --workers 2 did not start:\n{log.read_text()}")


@pytest.fixture(params=["metrics on the API's port", "metrics on a port of their own"])
def api(request: pytest.FixtureRequest, redis_url: str, tmp_path: Path) -> Iterator[Api]:
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "AETRAIN_REDIS_URL": redis_url, "AETRAIN_AUTH": "off",
           "AETRAIN_STORAGE": str(tmp_path / "storage"), "AETRAIN_API_WORKERS": "2",
           "AETRAIN_KEY_PREFIX": f"workers-{secrets.token_hex(4)}"}  # fmt: skip
    if request.param == "metrics on a port of their own":
        env["AETRAIN_METRICS_PORT"] = str(metrics_port)
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    else:
        metrics_url = f"http://127.0.0.1:{port}/metrics"
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log_path = tmp_path / "api.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "api", "--port", str(port)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    api = Api(process, f"http://127.0.0.1:{port}", metrics_url)
    try:
        wait_until_ready(api, log_path)
        yield api
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)


def worker_pids(api: Api) -> list[int]:
    """The supervisor's worker processes (multiprocessing's resource tracker aside)."""
    return [pid for pid in descendants(api.process.pid)
            if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()]  # fmt: skip


def alive(pid: int) -> bool:
    try:  # a zombie (state Z) has died; its reaper may not have come yet
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_two_workers_serve_one_port_sum_their_metrics_and_die_with_their_supervisor(
    api: Api,
) -> None:
    workers = worker_pids(api)
    assert len(workers) == 2
    job = httpx.post(f"{api.url}/v1/jobs", json=digits_spec(), timeout=10)
    assert job.status_code == 201, job.text
    # A new connection per read, so that both workers take some (the kernel's pick: about
    # half each, measured). Were each worker's histogram its own, a scrape would show only
    # the requests of the worker that answered it.
    for _ in range(READS):
        with httpx.Client(base_url=api.url, timeout=10) as http:
            read = http.get(f"/v1/jobs/{job.json()['id']}")
            assert read.status_code == 200 and read.json()["id"] == job.json()["id"]
    count = {"method": "GET", "route": "/v1/jobs/{job_id}", "status": "200"}
    # Asked a few times on new connections: whichever worker answers, the sum is the same.
    for _ in range(4):
        with httpx.Client(timeout=10) as http:
            samples = scrape(http.get(api.metrics_url).text)
        assert value(samples, f"{LATENCY}_count", **count) == READS
        assert value(samples, "aetrain_jobs", tenant="default", state="queued") == 1

    # A SIGKILLed supervisor (no chance to stop them) takes its workers along.
    os.kill(api.process.pid, signal.SIGKILL)
    api.process.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if alive(pid)]
    with pytest.raises(httpx.ConnectError):  # nothing serves the port any more
        httpx.get(f"{api.url}/healthz", timeout=2)


def test_metric_folders_of_dead_supervisors_are_removed_and_live_ones_kept(
    tmp_path: Path,
) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid names no process now
    gone = tmp_path / f"{FOLDER_PREFIX}{dead.pid}-abc"
    mine = tmp_path / f"{FOLDER_PREFIX}{os.getpid()}-def"
    for folder in (gone, mine):
        folder.mkdir()
        (folder / "histogram_1.db").write_bytes(b"x")
    assert remove_orphaned_folders(tmp_path) == [gone]
    assert not gone.exists() and mine.exists()

"""`aetrain up` as a user runs it: submit the example with the CLI, stop, start, find it all;
then, on its worst day, the whole stack (API, dispatcher, Ray, redis-server and `up` itself)
killed at once and started again; and Redis alone killed with SIGKILL mid-traffic under it."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import descendants, free_port

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "digits-dense.yaml"
TERMINAL = {"succeeded", "failed", "cancelled"}
LONG_EPOCHS, CHECKPOINT_EVERY = 300, 30  # an epoch takes ~25 ms: room for a slow stop


class UpProcess:
    def __init__(self, home: Path, port: int) -> None:
        self.home, self.port = home, port
        self.url = f"http://127.0.0.1:{port}"
        self.env = {
            **os.environ,
            "AETRAIN_HOME": str(home),
            "RAY_AUTH_MODE": "token",
            "AETRAIN_URL": self.url,
        }
        # `up` starts a Ray of its own, as a user's does.
        self.env.pop("RAY_ADDRESS", None)
        self.env.pop("AETRAIN_REDIS_URL", None)
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "up", "--port", str(self.port)],
            env=self.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stdout and self.process.stdout.read()
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise AssertionError("aetrain up did not become ready in 90 s")

    def stop(self) -> str:
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        out, _ = self.process.communicate(timeout=90)
        assert self.process.returncode == 0, out
        return out

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "service.cli", *args],
            env=self.env, cwd=REPO, capture_output=True, text=True, timeout=240,
        )  # fmt: skip


@pytest.fixture
def up(tmp_path: Path) -> Iterator[UpProcess]:
    stack = UpProcess(tmp_path / ".aetrain", free_port())
    yield stack
    if stack.process is not None and stack.process.poll() is None:
        stack.process.kill()


@pytest.fixture(scope="module")
def shared_up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    """One `aetrain up` that the module's tests take turns on (a start costs ~25 CPU-s on 2
    cores: Redis, its Ray, the dispatcher, the API and a warm group)."""
    stack = UpProcess(tmp_path_factory.mktemp("up") / ".aetrain", free_port())
    # `up` holds a crashed Redis down for 4 s before it starts it again, so the outage is
    # there to observe whoever wins the race (it once had Redis back before the first probe).
    stack.env["AETRAIN_FAULT_RESTART_DELAY_S"] = "4"
    yield stack
    if stack.process is not None and stack.process.poll() is None:
        stack.process.kill()


def wait_for_job(
    url: str, job_id: str, done: Callable[[dict[str, Any]], bool], timeout_s: float = 120
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job: dict[str, Any] = httpx.get(f"{url}/v1/jobs/{job_id}").json()
        if done(job):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not get there: {job}")


@pytest.mark.timeout(420)
def test_up_runs_the_example_and_keeps_every_job_through_a_stop_and_a_kill_of_everything(
    shared_up: UpProcess, tmp_path: Path
) -> None:
    up = shared_up
    up.start()
    submitted = up.cli("submit", str(EXAMPLE), "--wait")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.split()[0]
    assert "succeeded" in submitted.stdout
    result_before = json.loads(up.cli("result", job_id).stdout)
    assert result_before["metrics"]["val_mse"] > 0

    cancelled_id = httpx.post(f"{up.url}/v1/jobs", json=_example(epochs=5000)).json()["id"]
    httpx.post(f"{up.url}/v1/jobs/{cancelled_id}/cancel")
    wait_for_job(up.url, cancelled_id, lambda j: j["state"] == "cancelled")

    # A job still training when `up` stops goes back to the queue and resumes after the
    # restart; still training when everything is killed at once, it resumes again.
    long_id = httpx.post(
        f"{up.url}/v1/jobs", json=_example(epochs=LONG_EPOCHS, checkpoint_every=CHECKPOINT_EVERY)
    ).json()["id"]
    wait_for_job(up.url, long_id, lambda j: (j["epoch"] or 0) >= 40)

    out = up.stop()
    assert "aetrain stopped." in out
    assert (up.home / "redis" / "appendonlydir").is_dir()

    up.start()  # the same AETRAIN_HOME: Redis replays its append-only file
    listed = up.cli("list")
    assert job_id in listed.stdout and cancelled_id in listed.stdout, listed.stdout
    result_after = json.loads(up.cli("result", job_id).stdout)
    assert result_after == result_before
    assert httpx.get(f"{up.url}/v1/jobs/{cancelled_id}").json()["state"] == "cancelled"
    pulled = up.cli("pull", job_id, "-o", str(tmp_path / "encoder.pt"))
    assert pulled.returncode == 0, pulled.stderr
    assert (tmp_path / "encoder.pt").stat().st_size > 1000

    # Killed once the second run has written a checkpoint of its own, so that the third run
    # resumes from it. Not at a fixed epoch: when the stop came late, the first run had
    # checkpointed past it, and the third resumed from the first's (a CI failure).
    second = wait_for_job(up.url, long_id, lambda j: j["attempts"] == 2)
    # The first run's last epoch, or a later one of the second run's: the second run resumed
    # at most one past it, so the first checkpoint after it is the second run's. Two epochs
    # more, and that checkpoint is written.
    seen = second["epoch"] or 0
    checkpointed = seen + 1 + (-(seen + 2)) % CHECKPOINT_EVERY
    assert checkpointed + 2 < LONG_EPOCHS - 20, (seen, "the first run went too far: more epochs")
    wait_for_job(up.url, long_id, lambda j: (j["epoch"] or 0) >= checkpointed + 2, timeout_s=180)
    short_ids = [httpx.post(f"{up.url}/v1/jobs", json=_example(epochs=3)).json()["id"]
                 for _ in range(2)]  # fmt: skip
    kill_everything(up)
    # The same AETRAIN_HOME again, with the stale files of a Ray and processes killed at once.
    up.start()
    jobs = {i: wait_for_job(up.url, i, lambda j: j["state"] in TERMINAL, 240)
            for i in [long_id, *short_ids]}  # fmt: skip
    assert [j["state"] for j in jobs.values()] == ["succeeded"] * 3, jobs
    assert jobs[long_id]["attempts"] == 3
    assert httpx.get(f"{up.url}/v1/jobs/{job_id}").json()["state"] == "succeeded"
    lines = httpx.get(f"{up.url}/v1/jobs/{long_id}/artifacts/metrics.jsonl").text.splitlines()
    history = [json.loads(line) for line in lines]
    assert [m["epoch"] for m in history] == list(range(LONG_EPOCHS))
    runs = sorted({m["token"] for m in history})
    assert len(runs) == 3, runs
    # Each later run starts right after a checkpoint, not from epoch 0.
    for token in runs[1:]:
        first = next(m["epoch"] for m in history if m["token"] == token)
        assert first >= CHECKPOINT_EVERY and first % CHECKPOINT_EVERY == 0, (token, first)
    # Left running for the next test.


def kill_everything(up: UpProcess) -> None:
    """SIGKILL to `up` and all under it at once: API, dispatcher, redis-server and its Ray."""
    assert up.process is not None
    everything = [up.process.pid, *descendants(up.process.pid)]
    assert len(everything) > 6  # up, redis, worker, api and Ray's processes
    for pid in everything:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    up.process.wait()


def test_redis_killed_loses_no_acknowledged_job_and_the_api_says_503_meanwhile(
    shared_up: UpProcess,
) -> None:
    up = shared_up
    if up.process is None or up.process.poll() is not None:
        up.start()
    acknowledged = []
    for _ in range(20):
        response = httpx.post(f"{up.url}/v1/jobs", json=_example(epochs=2000), timeout=10)
        assert response.status_code == 201
        acknowledged.append(response.json()["id"])
    os.kill(child_pid(up, "redis-server"), signal.SIGKILL)  # right after the last 201

    started = time.monotonic()
    try:
        response = httpx.get(f"{up.url}/v1/jobs", timeout=10)
    except httpx.TransportError as exc:
        raise AssertionError("the API must answer during the outage") from exc
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"]
    assert time.monotonic() - started < 7.0  # an answer, not a hang on a dead socket

    def recovered() -> bool:
        try:
            return httpx.get(f"{up.url}/readyz", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    deadline = time.monotonic() + 60
    while not recovered():
        assert time.monotonic() < deadline, "the stack did not recover from the Redis kill"
        time.sleep(0.5)
    for job_id in acknowledged:
        job = httpx.get(f"{up.url}/v1/jobs/{job_id}", timeout=10)
        assert job.status_code == 200, job_id
    for job_id in acknowledged:  # nothing here needs them trained
        httpx.post(f"{up.url}/v1/jobs/{job_id}/cancel", timeout=10)
    assert "redis started again" in up.stop()


def child_pid(up: UpProcess, command: str) -> int:
    assert up.process is not None
    for pid in descendants(up.process.pid):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if command in cmdline:
            return pid
    raise AssertionError(f"no {command!r} under aetrain up")


def _example(**training: Any) -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    spec["training"] = {**spec["training"], **training}
    return spec


def test_cli_reports_an_unreachable_api_and_a_bad_spec(up: UpProcess, tmp_path: Path) -> None:
    down = up.cli("status", "j-anything")
    assert down.returncode == 1
    assert "cannot reach the aetrain API" in down.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: autoencoder\ndata: {dataset: digits}\nmodel: {latent_dim: [}\n")
    parsed = up.cli("submit", str(bad))
    assert parsed.returncode == 1 and "not valid YAML" in parsed.stderr

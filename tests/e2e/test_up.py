"""`aetrain up` as a user runs it: submit the example with the CLI, stop, start, find it all."""

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

from tests.conftest import free_port
from workers.group_pool import GroupPool

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "digits-dense.yaml"
TERMINAL = {"succeeded", "failed", "cancelled"}


class UpProcess:
    def __init__(self, home: Path, port: int, ray_address: str) -> None:
        self.home, self.port = home, port
        self.url = f"http://127.0.0.1:{port}"
        # The session's Ray stands in for the local one `up` would start (seconds saved).
        self.env = {
            **os.environ,
            "AETRAIN_HOME": str(home),
            "RAY_ADDRESS": ray_address,
            "RAY_AUTH_MODE": "token",
            "AETRAIN_URL": self.url,
        }
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
def up(tmp_path: Path, ray_address: str) -> Iterator[UpProcess]:
    stack = UpProcess(tmp_path / ".aetrain", free_port(), ray_address)
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


def test_up_runs_the_example_and_a_restart_keeps_every_job(
    up: UpProcess, tmp_path: Path, empty_group_pool: GroupPool
) -> None:
    """On the session's Ray, whose CPUs the session's idle groups give back first (the
    stack's own Redis does not see their holds)."""
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

    # A job still training when `up` stops goes back to the queue and resumes after the restart.
    long_spec = _example(epochs=300, checkpoint_every=50)
    long_id = httpx.post(f"{up.url}/v1/jobs", json=long_spec).json()["id"]
    wait_for_job(up.url, long_id, lambda j: (j["epoch"] or 0) >= 60)

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

    resumed = wait_for_job(up.url, long_id, lambda j: j["state"] in TERMINAL)
    assert resumed["state"] == "succeeded", resumed["error"]
    assert resumed["attempts"] == 2
    lines = httpx.get(f"{up.url}/v1/jobs/{long_id}/artifacts/metrics.jsonl").text.splitlines()
    history = [json.loads(line) for line in lines]
    assert [m["epoch"] for m in history] == list(range(300))
    second_run = [m["epoch"] for m in history if m["token"] == max(h["token"] for h in history)]
    # The second run starts right after a checkpoint (every 50 epochs), not from epoch 0.
    assert second_run[0] >= 50 and second_run[0] % 50 == 0, second_run[:3]
    up.stop()


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

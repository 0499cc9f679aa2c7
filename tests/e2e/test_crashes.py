"""`aetrain up` on its worst day: Redis killed with SIGKILL mid-traffic, and the whole stack
(API, dispatcher, Ray, redis-server and `up` itself) killed at once, then started again."""

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import descendants, free_port
from tests.e2e.test_up import TERMINAL, UpProcess, _example, wait_for_job
from workers.group_pool import GroupPool

pytestmark = [pytest.mark.ray, pytest.mark.timeout(400)]


def child_pid(up: UpProcess, command: str) -> int:
    assert up.process is not None
    for pid in descendants(up.process.pid):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if command in cmdline:
            return pid
    raise AssertionError(f"no {command!r} under aetrain up")


def test_redis_killed_loses_no_acknowledged_job_and_the_api_says_503_meanwhile(
    tmp_path: Path, ray_address: str, empty_group_pool: GroupPool
) -> None:
    up = UpProcess(tmp_path / ".aetrain", free_port(), ray_address)
    # `up` holds Redis down for 4 s, so the outage is there to observe whoever wins the race
    # (it once had Redis back before the first probe).
    up.env["AETRAIN_FAULT_RESTART_DELAY_S"] = "4"
    up.start()
    try:
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
    finally:
        if up.process is not None and up.process.poll() is None:
            up.process.kill()


def test_the_whole_stack_killed_at_once_starts_again_and_finishes_every_job(
    tmp_path: Path, ray_address: str
) -> None:
    up = UpProcess(tmp_path / ".aetrain", free_port(), ray_address)
    up.env.pop("RAY_ADDRESS")  # `up` starts its own Ray, which dies with everything else
    up.start()
    try:
        long_id = httpx.post(
            f"{up.url}/v1/jobs", json=_example(epochs=150, checkpoint_every=30)
        ).json()["id"]
        short_ids = [httpx.post(f"{up.url}/v1/jobs", json=_example(epochs=3)).json()["id"]
                     for _ in range(2)]  # fmt: skip
        wait_for_job(up.url, long_id, lambda j: (j["epoch"] or 0) >= 40, timeout_s=180)

        assert up.process is not None
        everything = [up.process.pid, *descendants(up.process.pid)]
        assert len(everything) > 6  # up, redis, worker, api and Ray's processes
        for pid in everything:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        up.process.wait()

        up.start()  # same AETRAIN_HOME; stale Ray files and the dead processes' leftovers
        jobs: dict[str, Any] = {
            job_id: wait_for_job(up.url, job_id, lambda j: j["state"] in TERMINAL, 240)
            for job_id in [long_id, *short_ids]
        }
        assert [j["state"] for j in jobs.values()] == ["succeeded"] * 3, jobs
        resumed = jobs[long_id]
        assert resumed["attempts"] == 2
        lines = httpx.get(f"{up.url}/v1/jobs/{long_id}/artifacts/metrics.jsonl").text
        history = [json.loads(line) for line in lines.splitlines()]
        assert [m["epoch"] for m in history] == list(range(150))
        last_token = max(m["token"] for m in history)
        second_run = [m["epoch"] for m in history if m["token"] == last_token]
        assert second_run[0] >= 30 and second_run[0] % 30 == 0, second_run[:3]
        up.stop()
    finally:
        if up.process is not None and up.process.poll() is None:
            up.process.kill()

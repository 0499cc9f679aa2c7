"""`aetrain up` on its worst day: the whole stack (API, dispatcher, Ray, redis-server and `up`
itself) killed at once, then started again. (Redis alone killed: tests/e2e/test_up.py, on
the stack its tests share.)"""

import json
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import descendants, free_port
from tests.e2e.test_up import TERMINAL, UpProcess, _example, wait_for_job

pytestmark = [pytest.mark.ray, pytest.mark.timeout(400)]


def test_the_whole_stack_killed_at_once_starts_again_and_finishes_every_job(
    tmp_path: Path,
) -> None:
    up = UpProcess(tmp_path / ".aetrain", free_port(), ray_address="")
    up.env.pop("RAY_ADDRESS")  # `up` starts its own Ray, which dies with everything else
    up.start()
    try:
        long_id = httpx.post(
            f"{up.url}/v1/jobs", json=_example(epochs=120, checkpoint_every=30)
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
        assert [m["epoch"] for m in history] == list(range(120))
        last_token = max(m["token"] for m in history)
        second_run = [m["epoch"] for m in history if m["token"] == last_token]
        assert second_run[0] >= 30 and second_run[0] % 30 == 0, second_run[:3]
        up.stop()
    finally:
        if up.process is not None and up.process.poll() is None:
            up.process.kill()

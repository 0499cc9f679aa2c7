"""Faults injected for real on a local Ray: a training worker killed, a rank hung (SIGSTOP).

Each job must end `succeeded` with its training resumed from the latest checkpoint, not from
epoch 0; the metrics stream shows where each run of the stage started.
"""

import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from shared.settings import Settings
from shared.storage import LocalStorage
from shared.store import JobStore
from tests.conftest import train_worker_pids
from tests.specs import digits_spec
from tests.workers.test_dispatcher import make_dispatcher, wait_for
from workers.dispatcher import Dispatcher
from workers.group_pool import GroupPool

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


@pytest.fixture
def dispatcher(
    store: JobStore, storage: LocalStorage, settings: Settings, ray_address: str,
    one_group_pool: GroupPool,
) -> Iterator[Dispatcher]:  # fmt: skip
    """On the session's pool, down to one idle 1-worker group: these tests count and kill
    worker processes."""
    running = make_dispatcher(store, storage, settings, ray_address, pool=one_group_pool)
    thread = threading.Thread(target=running.run_forever, daemon=True)
    thread.start()
    yield running
    running.stop()
    thread.join(timeout=60)


def run_starts(store: JobStore, job_id: str) -> list[int]:
    """The first epoch of each run of the job's stage, in the order the runs happened."""
    epochs = [entry["epoch"] for _, entry in store.metrics_after(job_id)]
    return [epochs[0]] + [b for a, b in zip(epochs, epochs[1:], strict=False) if b <= a]


def training_past(client: TestClient, job_id: str, epoch: int) -> Any:
    return wait_for(
        lambda: (client.get(f"/v1/jobs/{job_id}").json()["epoch"] or 0) >= epoch,
        120, f"epoch {epoch}",
    )  # fmt: skip


def finished(client: TestClient, job_id: str) -> dict[str, Any]:
    job: dict[str, Any] = wait_for(
        lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["state"] != "running"
        and j["state"] != "queued" and j,
        200, "the job to end",
    )  # fmt: skip
    return job


def test_a_killed_training_worker_is_restarted_from_the_latest_checkpoint(
    client: TestClient, store: JobStore, dispatcher: Dispatcher
) -> None:
    spec = digits_spec(epochs=100, checkpoint_every=20)
    spec["resources"]["max_failures"] = 1
    job_id = client.post("/v1/jobs", json=spec).json()["id"]
    training_past(client, job_id, 45)
    (worker,) = train_worker_pids()
    os.kill(worker, signal.SIGKILL)
    job = finished(client, job_id)
    assert job["state"] == "succeeded", job["error"]
    assert job["attempts"] == 1  # Ray restarted the worker group inside the same run
    starts = run_starts(store, job_id)
    assert starts[0] == 0 and len(starts) == 2, starts
    assert starts[1] > 0 and starts[1] % 20 == 0, starts  # the epoch after a checkpoint


def test_a_job_whose_worker_dies_past_max_failures_fails_and_the_group_trains_the_next(
    client: TestClient, store: JobStore, dispatcher: Dispatcher
) -> None:
    job_id = client.post("/v1/jobs", json=digits_spec(epochs=5000)).json()["id"]
    training_past(client, job_id, 3)
    (worker,) = train_worker_pids()
    os.kill(worker, signal.SIGKILL)  # max_failures 0: no second start
    job = finished(client, job_id)
    assert job["state"] == "failed" and job["attempts"] == 1, job
    assert "its worker died (failed 1 time(s); resources.max_failures is 0)" in job["error"], job
    # Ray Train restarted the group's workers and the group went on: the next job trains on
    # it, without a new group.
    assert dispatcher.pool.idle_count() == 1
    (group,) = dispatcher.pool.groups.values()
    stages = group.stages  # an earlier test may have left it warm
    next_id = client.post("/v1/jobs", json=digits_spec(epochs=2)).json()["id"]
    assert finished(client, next_id)["state"] == "succeeded"
    assert list(dispatcher.pool.groups.values()) == [group] and group.stages == stages + 1


def test_a_hung_rank_is_caught_by_the_progress_deadline_and_the_stage_retried(
    client: TestClient, store: JobStore, dispatcher: Dispatcher
) -> None:
    spec = digits_spec(epochs=40, workers=2, checkpoint_every=10)
    spec["resources"].update(max_failures=1, progress_timeout_s=6)
    job_id = client.post("/v1/jobs", json=spec).json()["id"]
    training_past(client, job_id, 15)
    stopped = train_worker_pids()[-1]
    os.kill(stopped, signal.SIGSTOP)
    try:
        job = finished(client, job_id)
    finally:
        try:
            os.kill(stopped, signal.SIGKILL)  # whatever Ray did, leave no stopped process
        except ProcessLookupError:
            pass
    assert job["state"] == "succeeded", job["error"]
    assert any("no epoch finished" in w and "restarted" in w for w in job["warnings"]), job
    starts = run_starts(store, job_id)
    assert starts[0] == 0 and len(starts) == 2, starts
    assert starts[1] > 0 and starts[1] % 10 == 0, starts


def test_a_dispatcher_killed_after_its_claim_or_before_the_artifacts_is_taken_over(
    client: TestClient, store: JobStore, storage: LocalStorage, settings: Settings,
    ray_address: str,
    tmp_path: Path,
    one_group_pool: GroupPool,
) -> None:  # fmt: skip
    job_id = client.post("/v1/jobs", json=digits_spec(epochs=20)).json()["id"]
    env = {**os.environ, "AETRAIN_REDIS_URL": settings.require_redis_url(),
           "AETRAIN_STORAGE": str(settings.storage_root), "RAY_ADDRESS": ray_address,
           "RAY_AUTH_MODE": "token", "AETRAIN_LEASE_TTL_S": "3"}  # fmt: skip

    def dispatcher_process(pause: str, name: str) -> subprocess.Popen[bytes]:
        with open(tmp_path / f"{name}.log", "wb") as log:
            return subprocess.Popen([sys.executable, "-m", "workers"],
                                    env={**env, "AETRAIN_FAULT_PAUSE": pause},
                                    stdout=log, stderr=subprocess.STDOUT)  # fmt: skip

    def job() -> dict[str, Any]:
        record: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        return record

    first = dispatcher_process("claimed:300", "first")
    try:  # killed between its claim and the first write of a stage
        wait_for(lambda: job()["state"] == "running", 60, "the first claim")
        time.sleep(1.0)
        assert job()["stages"][0]["state"] == "pending"
        first.kill()
        first.wait()
        second = dispatcher_process("finalizing:300", "second")
        try:  # killed after the last epoch, before any artifact
            wait_for(lambda: job()["stages"][0]["state"] == "succeeded", 120, "training to end")
            time.sleep(1.0)
            assert job()["state"] == "running" and job()["result"] is None
            second.kill()
            second.wait()
        finally:
            second.kill()
        # The third runs here, on the session's warm group: a process and a group fewer to
        # start (~20 CPU-s).
        third = make_dispatcher(store, storage, settings, ray_address, "third",
                                pool=one_group_pool)  # fmt: skip
        finishing = threading.Thread(target=third.run_forever, daemon=True)
        finishing.start()
        try:
            done = wait_for(lambda: job()["state"] in {"succeeded", "failed"} and job(), 120,
                            "the third dispatcher to finish the job")  # fmt: skip
        finally:
            third.stop()
            finishing.join(timeout=60)
    finally:
        first.kill()
    assert done["state"] == "succeeded", done["error"]
    assert done["attempts"] == 3 and done["takeovers"] == 2
    history = store.metrics_history(job_id)
    assert [m["epoch"] for m in history] == list(range(20))
    assert {m["token"] for m in history} == {2}  # only the second dispatcher trained
    # the artifacts are the third runner's; the stage was not trained again
    result = client.get(f"/v1/jobs/{job_id}/result").json()
    assert "encoder.pt" in result["artifacts"]
    folders = sorted(p.name for p in (storage.root / "jobs" / job_id).glob("attempt-*"))
    assert folders == ["attempt-3"]


def test_a_poison_job_fails_after_max_failures_with_its_error_and_does_not_hold_up_others(
    client: TestClient, store: JobStore, storage: LocalStorage, settings: Settings,
    ray_address: str,
    group_pool: GroupPool,
) -> None:  # fmt: skip
    body = io.BytesIO()
    np.savez(body, x=np.random.default_rng(0).random((200, 6)))
    dataset = client.post("/v1/datasets", content=body.getvalue()).json()["id"]
    storage.dataset_file(dataset).write_bytes(b"no longer an npz")  # every run fails alike
    poison = digits_spec(epochs=3)
    poison["data"] = {"dataset": dataset}
    poison["resources"]["max_failures"] = 2
    poison_id = client.post("/v1/jobs", json=poison).json()["id"]
    good_id = client.post("/v1/jobs", json=digits_spec(epochs=3)).json()["id"]

    dispatcher = make_dispatcher(store, storage, settings, ray_address, slots=2, pool=group_pool)
    thread = threading.Thread(target=dispatcher.run_forever, daemon=True)
    thread.start()
    try:
        poisoned, good = (finished(client, job_id) for job_id in (poison_id, good_id))
    finally:
        dispatcher.stop()
        thread.join(timeout=60)
    assert good["state"] == "succeeded", good["error"]
    assert poisoned["state"] == "failed" and poisoned["attempts"] == 1
    assert "stage train" in poisoned["error"] and "damaged" in poisoned["error"], poisoned
    log = (storage.root / "jobs" / poison_id / "logs" / "train-attempt-1.log").read_text()
    assert [f"start {n} of at most 3" in log for n in (1, 2, 3)] == [True] * 3, log

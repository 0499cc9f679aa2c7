"""Jobs through HTTP, the Redis queue and a real local Ray: success, DDP, cancel, two runners."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import ray
from fastapi.testclient import TestClient

from shared.settings import Settings
from shared.storage import LocalStorage
from shared.store import JobStore
from tests.conftest import train_worker_pids
from tests.specs import digits_spec
from workers.dispatcher import Dispatcher
from workers.group_pool import GroupPool

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

LOAD_ENCODER = """
import sys, torch
encoder = torch.jit.load(sys.argv[1])
codes = encoder(torch.rand(7, 64) * 16)
leaked = sorted(m for m in sys.modules if m.split('.')[0] in {'shared', 'service', 'workers'})
print(tuple(codes.shape), leaked)
"""


def make_dispatcher(
    store: JobStore,
    storage: LocalStorage,
    settings: Settings,
    ray_address: str,
    name: str = "d1",
    slots: int = 1,
    pool: GroupPool | None = None,
) -> Dispatcher:
    return Dispatcher(
        store, storage, settings.require_redis_url(), ray_address,
        lease_ttl_s=10.0, slots=slots, dispatcher_id=name, pool=pool,
    )  # fmt: skip


@contextlib.contextmanager
def running(dispatcher: Dispatcher) -> Iterator[Dispatcher]:
    """The dispatcher's loop in a thread of this process until the block ends, then stopped."""
    thread = threading.Thread(target=dispatcher.run_forever, daemon=True)
    thread.start()
    try:
        yield dispatcher
    finally:
        dispatcher.stop()
        thread.join(timeout=60)


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture
def running_dispatchers(
    store: JobStore, storage: LocalStorage, settings: Settings, ray_address: str,
    one_group_pool: GroupPool,
) -> Iterator[Callable[[int], list[Dispatcher]]]:  # fmt: skip
    """Dispatchers sharing the session's pool, down to one idle 1-worker group: their tests
    count workers."""
    started: list[tuple[Dispatcher, threading.Thread]] = []

    def start(count: int) -> list[Dispatcher]:
        for i in range(count):
            dispatcher = make_dispatcher(store, storage, settings, ray_address, f"d{i}",
                                         pool=one_group_pool)  # fmt: skip
            thread = threading.Thread(target=dispatcher.run_forever, daemon=True)
            thread.start()
            started.append((dispatcher, thread))
        return [d for d, _ in started]

    yield start
    for dispatcher, _ in started:
        dispatcher.stop()
    for _, thread in started:
        thread.join(timeout=60)


def check_finished_job(client: TestClient, job_id: str, epochs: int, tmp_path: Path) -> float:
    """Assert everything a finished job must show; returns its validation MSE."""
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded", job["error"]
    assert job["epoch"] == epochs - 1 and job["attempts"] == 1
    assert job["stages"][0]["state"] == "succeeded"
    result = client.get(f"/v1/jobs/{job_id}/result").json()
    metrics = result["metrics"]
    # A digits autoencoder with a 16-d code after a few epochs: far below the data's variance
    # (~0.1 after minmax) and within reach of PCA at the same size.
    assert 0 < metrics["val_mse"] < 0.05
    assert metrics["mse_ratio_vs_pca"] < 3
    assert set(result["artifacts"]) >= {"encoder.pt", "encoder.safetensors", "encoder.onnx",
                                        "model.json", "metrics.jsonl", "result.json",
                                        "curves.png"}  # fmt: skip

    lines = client.get(f"/v1/jobs/{job_id}/artifacts/metrics.jsonl").text.splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(epochs))
    stored = json.loads(client.get(f"/v1/jobs/{job_id}/artifacts/result.json").text)
    assert stored["metrics"]["val_mse"] == pytest.approx(metrics["val_mse"])

    encoder_file = tmp_path / f"{job_id}.pt"
    encoder_file.write_bytes(client.get(f"/v1/jobs/{job_id}/encoder").content)
    # A clean interpreter in another folder: torch only, aetrain never imported.
    loaded = subprocess.run(
        [sys.executable, "-c", LOAD_ENCODER, str(encoder_file)],
        capture_output=True, text=True, cwd=tmp_path, check=True,
    )  # fmt: skip
    assert loaded.stdout.strip() == "(7, 16) []"
    weights = client.get(f"/v1/jobs/{job_id}/encoder", params={"format": "safetensors"})
    assert weights.status_code == 200 and len(weights.content) > 64 * 128 * 4
    return float(metrics["val_mse"])


def test_spec_goes_through_http_to_a_loadable_encoder(
    client: TestClient,
    store: JobStore,
    storage: LocalStorage,
    settings: Settings,
    ray_address: str,
    tmp_path: Path,
    group_pool: GroupPool,
) -> None:
    epochs = 12
    job_id = client.post("/v1/jobs", json=digits_spec(epochs=epochs)).json()["id"]
    make_dispatcher(store, storage, settings, ray_address, pool=group_pool).run_once(2000)
    check_finished_job(client, job_id, epochs, tmp_path)  # on 2 ranks: the test below


def training_job(client: TestClient, job_id: str) -> dict[str, Any]:
    def training() -> dict[str, Any] | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["state"] == "running" and (job["epoch"] or 0) >= 2 else None

    job: dict[str, Any] = wait_for(training, 120, "the job to train a few epochs")
    return job


def wait_until_ended(client: TestClient, job_id: str, timeout_s: float) -> dict[str, Any]:
    job: dict[str, Any] = wait_for(
        lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["state"]
        in {"succeeded", "failed", "cancelled"} and j,
        timeout_s, f"job {job_id} to end",
    )  # fmt: skip
    return job


def alive(pid: int) -> bool:
    try:
        return not Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return False


def test_a_cancelled_stage_ends_on_its_warm_group_which_then_trains_the_next_job(
    client: TestClient,
    store: JobStore,
    running_dispatchers: Callable[[int], list[Dispatcher]],
) -> None:
    job_id = client.post("/v1/jobs", json=digits_spec(epochs=5000)).json()["id"]
    (dispatcher,) = running_dispatchers(1)
    live = training_job(client, job_id)
    assert live["metrics"]["val_mse"] > 0  # per-epoch metrics reach the record while it runs
    workers = train_worker_pids()
    assert len(workers) == 1, "one RayTrainWorker process should be training"
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["cancel_requested"] is True
    cancelled_at = time.monotonic()
    job = wait_until_ended(client, job_id, 10)
    assert time.monotonic() - cancelled_at < 5  # the stage stops at its next batch
    assert job["state"] == "cancelled" and job["error"] == "cancelled by request"
    assert job["stages"][0]["state"] == "cancelled"

    # The stage ended; its group did not: the same worker, idle, its CPU now the group's hold
    # rather than the job's grant.
    wait_for(lambda: dispatcher.pool.idle_count() == 1, 5, "the group to be idle")
    assert train_worker_pids() == workers
    assert job_id not in store.scheduler.asking_jobs()
    assert list(store.scheduler.holds().values()) == [{"CPU": 1.0}]
    assert store.scheduler.reserved() == ({"CPU": 1.0}, 0)

    next_id = client.post("/v1/jobs", json=digits_spec(epochs=2)).json()["id"]
    assert wait_until_ended(client, next_id, 60)["state"] == "succeeded"
    assert train_worker_pids() == workers  # trained by the warm group: no new worker


def test_a_group_that_does_not_stop_its_cancelled_stage_is_killed_and_replaced(
    client: TestClient,
    store: JobStore,
    running_dispatchers: Callable[[int], list[Dispatcher]],
) -> None:
    job_id = client.post("/v1/jobs", json=digits_spec(epochs=5000)).json()["id"]
    (dispatcher,) = running_dispatchers(1)
    training_job(client, job_id)
    (worker,) = train_worker_pids()
    os.kill(worker, signal.SIGSTOP)  # a rank that cannot obey
    try:
        client.post(f"/v1/jobs/{job_id}/cancel")
        cancelled_at = time.monotonic()
        job = wait_until_ended(client, job_id, 30)
        took = time.monotonic() - cancelled_at
        assert job["state"] == "cancelled", job
        assert 9 < took < 20, took  # asked, given 10 s, then its group was killed
        wait_for(lambda: not alive(worker), 10, "the stopped worker to be killed with its group")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)
    assert dispatcher.pool.idle_count() == 0 and store.scheduler.reserved() == ({}, 0)
    next_id = client.post("/v1/jobs", json=digits_spec(epochs=2)).json()["id"]
    assert wait_until_ended(client, next_id, 120)["state"] == "succeeded"
    assert worker not in train_worker_pids()  # a new group trained it


def test_two_dispatchers_run_each_of_four_jobs_exactly_once(
    client: TestClient,
    store: JobStore,
    storage: LocalStorage,
    running_dispatchers: Callable[[int], list[Dispatcher]],
) -> None:
    ids = [client.post("/v1/jobs", json=digits_spec(epochs=2)).json()["id"] for _ in range(4)]
    running_dispatchers(2)

    def all_finished() -> list[dict[str, Any]] | None:
        jobs = [client.get(f"/v1/jobs/{job_id}").json() for job_id in ids]
        return jobs if all(j["state"] in {"succeeded", "failed"} for j in jobs) else None

    jobs = wait_for(all_finished, 200, "four jobs to finish")
    assert [j["state"] for j in jobs] == ["succeeded"] * 4, [j["error"] for j in jobs]
    for job in jobs:
        assert job["attempts"] == 1
        tokens = {m["token"] for m in store.metrics_history(job["id"])}
        assert len(tokens) == 1, tokens  # every epoch came from one run
        attempts = sorted(p.name for p in (storage.root / "jobs" / job["id"]).glob("attempt-*"))
        assert len(attempts) == 1
    assert store.queued_ids() == [] and store.redis.scard(store.keys.active) == 0


def test_stages_of_two_jobs_share_the_cluster_and_a_two_rank_stage_waits_then_trains_alike(
    client: TestClient, store: JobStore, storage: LocalStorage, settings: Settings,
    ray_address: str,
    tmp_path: Path,
    empty_group_pool: GroupPool,
) -> None:  # fmt: skip
    assert ray.cluster_resources()["CPU"] == 2
    epochs = 12
    ids = []
    for workers in (1, 1, 2):
        response = client.post("/v1/jobs", json=digits_spec(epochs=epochs, workers=workers))
        ids.append(response.json()["id"])
        time.sleep(0.002)  # distinct submission times keep the order a, b, then the big one
    # A pool of its own, without warm groups: a and b wait for new groups alike, so their
    # stages overlap however quickly they train (on a warm group a ended before b began).
    dispatcher = make_dispatcher(store, storage, settings, ray_address, slots=3)
    thread = threading.Thread(target=dispatcher.run_forever, daemon=True)
    thread.start()
    try:

        def all_finished() -> list[dict[str, Any]] | None:
            jobs = [client.get(f"/v1/jobs/{job_id}").json() for job_id in ids]
            return jobs if all(j["state"] in {"succeeded", "failed"} for j in jobs) else None

        jobs = wait_for(all_finished, 200, "three jobs to finish")
    finally:
        dispatcher.stop()
        thread.join(timeout=60)
    assert [j["state"] for j in jobs] == ["succeeded"] * 3, [j["error"] for j in jobs]
    spans = []
    for job in jobs:
        (stage,) = job["stages"]
        spans.append((datetime.fromisoformat(stage["started_at"]),
                      datetime.fromisoformat(stage["finished_at"])))  # fmt: skip
    (a_start, a_end), (b_start, b_end), (big_start, _) = spans
    assert max(a_start, b_start) < min(a_end, b_end), spans  # the two 1-worker stages overlap
    assert big_start >= max(a_end, b_end), spans  # the 2-worker stage waited for both
    assert store.scheduler.reserved() == ({}, 0)
    # 2-rank DDP (gloo): same global batch and data as a, only the sampling order differs.
    two_ranks = check_finished_job(client, ids[2], epochs, tmp_path)
    one_rank = client.get(f"/v1/jobs/{ids[0]}/result").json()["metrics"]["val_mse"]
    assert two_ranks == pytest.approx(one_rank, rel=0.3), (two_ranks, one_rank)


def test_a_stage_is_not_started_on_a_storage_below_the_free_disk_floor(
    client: TestClient, store: JobStore, storage: LocalStorage, settings: Settings,
    ray_address: str,
    group_pool: GroupPool,
) -> None:  # fmt: skip
    job_id = client.post("/v1/jobs", json=digits_spec()).json()["id"]
    full = Dispatcher(
        store,
        storage,
        settings.require_redis_url(),
        ray_address,
        min_free_disk_bytes=2**62,
        pool=group_pool,
    )  # more than any disk has
    full.run_once(block_ms=2000)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "failed"
    assert "not started" in job["error"] and "AETRAIN_MIN_FREE_DISK_BYTES" in job["error"]
    assert not list(storage.runs_root.glob(f"{job_id}-*"))  # nothing was written for it

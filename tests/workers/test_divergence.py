"""A job whose training diverges fails with a reason, and every JSON the service sends stays JSON.

NaN and Infinity are not JSON: Starlette refuses to send them (a 500), and a client's parser
refuses to read them. One diverged job used to break its record, its events, its result and
its tenant's whole job list.
"""

import json
import math
from typing import Any

import pytest
from fastapi.testclient import TestClient

from shared.jobs import JobRecord, JobState, StageState
from shared.settings import Settings
from shared.specs import parse_job_spec
from shared.storage import LocalStorage
from shared.store import JobStore
from workers.dispatcher import Dispatcher
from workers.group_pool import GroupPool

SWISS_ROLL: dict[str, Any] = {
    "kind": "autoencoder",
    "data": {"dataset": "swiss_roll", "n_samples": 500},
    "model": {"arch": "dense", "hidden": [16], "latent_dim": 2, "activation": "tanh"},
    "objective": {"loss": "mse"},
}
# SGD with momentum at lr 10 overflows within 2-3 epochs here (measured: train_loss ~1e16, then
# NaN). A checkpoint every epoch and max_failures 2: a Ray restart would resume from one and
# publish its epochs again.
DIVERGING = {
    **SWISS_ROLL,
    "name": "swiss-roll-diverging",
    "training": {"epochs": 8, "batch_size": 64, "optimizer": "sgd", "lr": 10.0,
                 "checkpoint_every": 1},
    "resources": {"max_failures": 2},
}  # fmt: skip
HEALTHY = {
    **SWISS_ROLL,
    "name": "swiss-roll-healthy",
    "training": {"epochs": 2, "batch_size": 64, "lr": 0.003, "checkpoint_every": 2},
}
NON_FINITE = {"train_loss": math.nan, "val_mse": math.inf, "samples_per_s": -math.inf,
              "epoch_seconds": 0.5}  # fmt: skip


def strict_json(text: str | bytes) -> Any:
    """json.loads that refuses NaN and Infinity, as every JSON parser but Python's does."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def get_json(client: TestClient, path: str, status: int = 200) -> Any:
    response = client.get(path)
    assert response.status_code == status, (path, response.text)
    return strict_json(response.content)


def sse_events(client: TestClient, job_id: str) -> list[tuple[str, Any]]:
    """The events of a finished job: (event, data), every data parsed as strict JSON."""
    response = client.get(f"/v1/jobs/{job_id}/events")
    assert response.status_code == 200, response.text
    events = []
    for block in response.text.strip().split("\n\n"):
        lines = [line for line in block.splitlines() if not line.startswith(":")]
        fields = dict(line.split(": ", 1) for line in lines)
        if fields:
            events.append((fields["event"], strict_json(fields["data"])))
    return events


def publish_as_an_old_worker(
    store: JobStore, job_id: str, token: int, stage: str, epoch: int, metrics: dict[str, float]
) -> None:
    """What JobStore.record_progress wrote before metrics were made safe: `json.dumps`, NaN
    and all (the progress hash and the metrics stream, as in shared/store.py)."""
    text = json.dumps(metrics)
    assert "NaN" in text
    store.redis.hset(
        store.keys.progress(job_id),
        mapping={stage: f'{{"epoch": {epoch}, "metrics": {text}}}', "_latest": stage},
    )
    store.redis.xadd(store.keys.metrics(job_id),
                     {"stage": stage, "epoch": epoch, "metrics": text, "token": token})  # fmt: skip


@pytest.mark.parametrize("writer", ["record_progress", "old_worker"])
def test_non_finite_metrics_in_redis_leave_record_list_result_and_events_valid_json(
    client: TestClient, store: JobStore, writer: str
) -> None:
    job, _ = store.submit(JobRecord.for_spec(parse_job_spec(DIVERGING)))
    claim = store.claim("test-runner", lease_ttl_s=30.0, block_ms=50)
    assert claim is not None and claim.job.id == job.id
    store.update(job.id, claim.token, lambda j: j.with_stage("train", StageState.RUNNING))
    for epoch in (0, 1):
        if writer == "old_worker":
            publish_as_an_old_worker(store, job.id, claim.token, "train", epoch, NON_FINITE)
        else:
            assert store.record_progress(job.id, claim.token, "train", epoch, NON_FINITE)

    record = get_json(client, f"/v1/jobs/{job.id}")
    assert record["epoch"] == 1 and record["metrics"]["train_loss"] is None
    assert record["metrics"]["epoch_seconds"] == 0.5
    assert record["stages"][0]["metrics"]["val_mse"] is None
    listed = get_json(client, "/v1/jobs")["items"]
    assert [j["id"] for j in listed] == [job.id] and listed[0]["metrics"]["samples_per_s"] is None
    assert [m["train_loss"] for m in store.metrics_history(job.id)] == [None, None]

    # A stage result and a final result with NaN, as a dispatcher wrote them before.
    def stage_done(j: JobRecord) -> JobRecord:
        return j.with_stage("train", StageState.SUCCEEDED,
                            result={"val_mse": math.nan, "pca_val_mse": 0.1})  # fmt: skip

    store.update(job.id, claim.token, stage_done)
    result = {"metrics": {"val_mse": math.nan, "mse_ratio_vs_pca": math.inf, "pca_val_mse": 0.1},
              "artifacts": [], "folder": "nowhere"}  # fmt: skip
    store.finish(claim, JobState.SUCCEEDED, result=result)

    record = get_json(client, f"/v1/jobs/{job.id}")
    assert record["stages"][0]["result"] == {"val_mse": None, "pca_val_mse": 0.1}
    assert get_json(client, "/v1/jobs?state=succeeded")["items"][0]["id"] == job.id
    final = get_json(client, f"/v1/jobs/{job.id}/result")["metrics"]
    assert final == {"val_mse": None, "mse_ratio_vs_pca": None, "pca_val_mse": 0.1}
    events = sse_events(client, job.id)
    epochs = [data for kind, data in events if kind == "epoch"]
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert epochs[0]["metrics"] == {"train_loss": None, "val_mse": None, "samples_per_s": None,
                                    "epoch_seconds": 0.5}  # fmt: skip
    assert events[-1] == ("end", {"state": "succeeded"})


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_diverging_job_fails_once_with_a_reason_and_its_neighbour_succeeds(
    client: TestClient, store: JobStore, storage: LocalStorage, settings: Settings,
    ray_address: str,
    group_pool: GroupPool,
) -> None:  # fmt: skip
    diverging = client.post("/v1/jobs", json=DIVERGING).json()["id"]
    healthy = client.post("/v1/jobs", json=HEALTHY).json()["id"]
    dispatcher = Dispatcher(store, storage, settings.require_redis_url(), ray_address,
                            pool=group_pool)  # fmt: skip
    ran = [dispatcher.run_once(block_ms=2000), dispatcher.run_once(block_ms=2000)]
    assert [job.id for job in ran if job is not None] == [diverging, healthy]

    job = get_json(client, f"/v1/jobs/{diverging}")
    assert job["state"] == "failed"
    epoch = job["epoch"]
    assert job["error"] == (f"training diverged at epoch {epoch} of stage train: the loss is not "
                            "finite (try a lower training.lr)")  # fmt: skip
    assert any("training diverged" in warning for warning in job["warnings"])
    assert job["metrics"]["train_loss"] is None  # published as null, not NaN
    assert job["stages"][0]["state"] == "failed" and job["stages"][0]["epoch"] == epoch
    assert epoch < DIVERGING["training"]["epochs"] - 1  # it stopped early
    # Not retried: every epoch was published once, and the run stopped at the diverged one.
    events = sse_events(client, diverging)
    assert [d["epoch"] for kind, d in events if kind == "epoch"] == list(range(epoch + 1))
    assert events[-1] == ("end", {"state": "failed"})
    not_ready = get_json(client, f"/v1/jobs/{diverging}/result", status=409)
    assert "training diverged" in json.dumps(not_ready)

    listed = {j["id"]: j for j in get_json(client, "/v1/jobs")["items"]}
    assert listed[diverging]["state"] == "failed" and listed[healthy]["state"] == "succeeded"
    job = get_json(client, f"/v1/jobs/{healthy}")
    assert job["state"] == "succeeded", job["error"]
    result = get_json(client, f"/v1/jobs/{healthy}/result")
    assert all(math.isfinite(v) for v in result["metrics"].values() if v is not None)
    assert get_json(client, f"/v1/jobs/{healthy}/artifacts/result.json")["metrics"]
    lines = client.get(f"/v1/jobs/{healthy}/artifacts/metrics.jsonl").text.splitlines()
    assert [strict_json(line)["epoch"] for line in lines] == [0, 1]
    assert [d["epoch"] for kind, d in sse_events(client, healthy) if kind == "epoch"] == [0, 1]

"""GET /v1/jobs/{id}/events against a real Redis: states, epochs, the end, and resuming."""

import json
import threading
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from shared.jobs import JobState, StageState
from shared.store import JobStore
from tests.specs import digits_spec

pytestmark = pytest.mark.timeout(60)


def read_events(client: TestClient, job_id: str, **headers: str) -> list[tuple[str, Any, str]]:
    """(event, data, id) of every event until the stream closes."""
    events, fields = [], {"id": ""}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                if "event" in fields:
                    events.append((fields["event"], json.loads(fields["data"]), fields["id"]))
                fields = {"id": ""}
            elif not line.startswith(":"):
                key, _, value = line.partition(": ")
                fields[key] = value
    return events


def test_a_live_job_streams_its_states_and_epochs_then_ends(
    client: TestClient, store: JobStore
) -> None:
    job_id = client.post("/v1/jobs", json=digits_spec()).json()["id"]

    def runner() -> None:
        time.sleep(0.7)
        claim = store.claim("r1", 30.0, block_ms=100)
        assert claim is not None
        store.update(job_id, claim.token, lambda j: j.with_stage("train", StageState.RUNNING))
        for epoch in range(3):
            time.sleep(0.3)
            store.record_progress(
                job_id, claim.token, "train", epoch, {"val_mse": 1.0 / (epoch + 1)}
            )
        store.update(job_id, claim.token, lambda j: j.with_stage("train", StageState.SUCCEEDED))
        store.finish(claim, JobState.SUCCEEDED, result={"metrics": {}, "artifacts": []})

    thread = threading.Thread(target=runner)
    thread.start()
    events = read_events(client, job_id)
    thread.join()

    kinds = [kind for kind, _, _ in events]
    assert kinds[0] == "state" and events[0][1]["state"] == "queued"
    assert kinds[-1] == "end" and events[-1][1] == {"state": "succeeded"}
    states = [data["state"] for kind, data, _ in events if kind == "state"]
    assert states[0] == "queued" and states[-1] == "succeeded" and "running" in states
    epochs = [data for kind, data, _ in events if kind == "epoch"]
    assert [(e["stage"], e["epoch"]) for e in epochs] == [("train", 0), ("train", 1), ("train", 2)]
    assert epochs[2]["metrics"] == {"val_mse": pytest.approx(1 / 3)}
    last_state = [data for kind, data, _ in events if kind == "state"][-1]
    assert last_state["stages"] == [{"name": "train", "state": "succeeded", "epoch": 2}]


def test_last_event_id_resumes_after_the_last_epoch_seen(
    client: TestClient, store: JobStore
) -> None:
    job_id = client.post("/v1/jobs", json=digits_spec()).json()["id"]
    claim = store.claim("r1", 30.0, block_ms=100)
    assert claim is not None
    for epoch in range(4):
        store.record_progress(job_id, claim.token, "train", epoch, {"val_mse": 1.0})
    store.finish(claim, JobState.FAILED, error="boom")

    everything = read_events(client, job_id)
    epoch_ids = [event_id for kind, _, event_id in everything if kind == "epoch"]
    assert len(epoch_ids) == 4 and everything[-1][1] == {"state": "failed"}
    resumed = read_events(client, job_id, **{"Last-Event-ID": epoch_ids[1]})
    assert [d["epoch"] for kind, d, _ in resumed if kind == "epoch"] == [2, 3]
    assert [e for e in everything if e[0] == "state"][0][1]["error"] == "boom"


def test_events_of_an_unknown_job_are_404(client: TestClient) -> None:
    assert client.get("/v1/jobs/j000000000000deadbeef/events").status_code == 404
    bad_id = client.get("/v1/jobs/x/events", headers={"Last-Event-ID": "../../"})
    assert bad_id.status_code == 422

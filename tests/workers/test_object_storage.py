"""AETRAIN_STORAGE=s3://bucket/prefix against a real S3 API on loopback (moto's server).

Uploads, checkpoints, stage logs, artifacts and downloads go through the bucket alone: the
training job below trains on an upload stored there, and its encoder is downloaded through the
API from there (a job resuming from its checkpoint there after losing a rank's node:
tests/e2e/test_two_nodes.py). An object store has no rename, so the checkpoints' "manifest
written last" is what makes one whole; these tests cut saves short and damage files to show
that it still holds.
"""

import hashlib
import io
import json
import os
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from sklearn.datasets import load_digits

from service.app import create_app
from shared import locations
from shared.group_channel import StageTask
from shared.object_storage import ObjectStorage
from shared.settings import Settings
from shared.store import JobStore
from tests.conftest import free_port
from tests.service.helpers import serve, succeeded_job
from tests.specs import digits_spec
from tests.workers.test_dispatcher import make_dispatcher, wait_for
from tests.workers.test_faults import finished
from tests.workers.test_lease import claimed
from workers.checkpoints import (
    MANIFEST_FILE,
    check,
    checkpoint_folders,
    latest_valid_checkpoint,
    load_state,
    prune_run,
    save_checkpoint,
)
from workers.dispatcher import Dispatcher
from workers.group_pool import GroupPool
from workers.janitor import sweep
from workers.stage_log import stage_log
from workers.train_loop import write_checkpoint

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def s3_storage(s3_url: str) -> ObjectStorage:
    return ObjectStorage(s3_url)


@pytest.fixture
def s3_settings(settings: Settings, s3_url: str) -> Settings:
    return settings.model_copy(update={"storage": s3_url})


@pytest.fixture
def s3_client(s3_settings: Settings, store: JobStore) -> Iterator[TestClient]:
    with TestClient(create_app(s3_settings)) as client:
        yield client


def keys_under(storage: ObjectStorage, relative: str) -> list[str]:
    """Every object under a folder of the store, relative to it."""
    fs, root = locations.s3_filesystem(), storage.location(relative)[len("s3://") :]
    from pyarrow import fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(i.path[len(root) + 1 :] for i in infos if i.type == pafs.FileType.File)


def test_files_round_trip_through_the_bucket(s3_storage: ObjectStorage) -> None:
    log = s3_storage.location("jobs/j1/logs/train-attempt-1.log")
    locations.write_bytes(log, b"first line\nsecond line\n")
    assert locations.read_bytes(log) == b"first line\nsecond line\n"
    assert locations.read_range(log, -5, 100) == (b"line\n", 18, 23)
    assert locations.read_range(log, 6, 4) == (b"line", 6, 23)
    assert locations.read_range(log, 99, 4) == (b"", 23, 23)
    assert b"".join(locations.chunks(log, chunk=7)) == b"first line\nsecond line\n"
    assert locations.size_of(log) == 23
    assert locations.size_of(s3_storage.location("jobs/j1")) is None  # a folder is no file

    (entry,) = s3_storage.entries("jobs/j1")
    assert entry.name == "logs" and entry.is_dir and not entry.is_file
    (entry,) = s3_storage.entries("jobs/j1/logs")
    assert entry.name == "train-attempt-1.log" and entry.is_file and entry.size == 23
    assert s3_storage.entries("jobs/absent") == []

    assert s3_storage.delete_job_files("j1") == 23
    assert s3_storage.entries("jobs") == []
    with pytest.raises(FileNotFoundError):
        locations.read_bytes(log)


def test_a_stage_log_is_stored_while_it_grows_and_whole_at_its_end(
    s3_storage: ObjectStorage,
) -> None:
    log = s3_storage.location("jobs/j1/logs/train-attempt-3.log")
    with stage_log(log) as say:
        say("first")
        say("second")
        # Stored within PUBLISH_S while the run goes on, not only at its end.
        wait_for(lambda: locations.size_of(log), 10, "the log in the bucket")
        assert locations.read_bytes(log).decode().count("\n") == 2
        say("third")
    assert locations.read_bytes(log).decode().count("\n") == 3  # whole at the end
    with stage_log(log) as say:  # a restart of the same run carries on the same log
        say("fourth")
    lines = locations.read_bytes(log).decode().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["first", "second", "third", "fourth"]


def model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 8)
    return model, torch.optim.Adam(model.parameters())


def test_checkpoints_without_renames_skip_cut_short_and_damaged_saves(
    s3_storage: ObjectStorage,
) -> None:
    run = s3_storage.run_location("j1", "train")
    for epoch in (1, 3, 5):
        folder = locations.join(run, f"checkpoint_{epoch:06d}-7-1")
        save_checkpoint(folder, *model_and_optimizer(epoch), epoch, "{}")
    # A save cut short: its state is stored, its manifest (written last) is not.
    unfinished = locations.join(run, "checkpoint_000009-8-1")
    save_checkpoint(unfinished, *model_and_optimizer(9), 9, "{}")
    locations.remove_tree(locations.join(unfinished, MANIFEST_FILE))
    # A damaged one: a state file that no longer matches its manifest.
    damaged = locations.join(run, "checkpoint_000007-8-1")
    save_checkpoint(damaged, *model_and_optimizer(7), 7, "{}")
    state = locations.join(damaged, "state.pt")
    locations.write_bytes(state, locations.read_bytes(state)[:-10])

    lines: list[str] = []
    newest = latest_valid_checkpoint(run, lines.append)
    assert newest == locations.join(run, "checkpoint_000005-7-1")
    assert any("skipped checkpoint_000009-8-1" in line and "manifest" in line for line in lines)
    assert any("skipped checkpoint_000007-8-1" in line for line in lines), lines
    model, _ = model_and_optimizer(5)
    assert torch.equal(load_state(newest)["model"]["weight"], model.state_dict()["weight"])

    deleted = prune_run(run, keep=[newest], num_to_keep=1, say=None)
    assert sorted(locations.name_of(d) for d in deleted) == [
        "checkpoint_000001-7-1", "checkpoint_000007-8-1", "checkpoint_000009-8-1",
    ]  # fmt: skip
    left = [locations.name_of(f) for f in checkpoint_folders(run)]
    assert left == ["checkpoint_000003-7-1", "checkpoint_000005-7-1"]


def test_a_lease_lost_during_the_upload_commits_no_checkpoint_to_the_bucket(
    store: JobStore, s3_storage: ObjectStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = claimed(store)
    run = s3_storage.run_location(first.job.id, "train")
    model, optimizer = model_and_optimizer(0)
    taken_over: list[Any] = []
    upload = locations.write_bytes

    def slow_upload(location: str | Path, data: bytes, durable: bool = False) -> None:
        upload(location, data, durable)
        if str(location).endswith("/state.pt") and not taken_over:
            # The runner froze while its state went up; its lease lapsed, another took over.
            store.redis.delete(store.keys.lease(first.job.id))
            taken_over.append(store.claim("d2", 60.0, block_ms=100))

    monkeypatch.setattr(locations, "write_bytes", slow_upload)

    def task(token: int) -> StageTask:
        return StageTask(seq=1, job_id=first.job.id, token=token, stage="train", spec={},
                         inputs={}, run_folder=run, datasets_root="", log_path="",
                         metrics_cap=10, max_failures=0, submitted_at=0.0)  # fmt: skip

    lines: list[str] = []
    # The lease is read after the state's upload, before the manifest that would commit it.
    assert write_checkpoint(task(first.token), store, run, model, optimizer, 6, "{}", 2,
                            lines.append) is None  # fmt: skip
    assert any("not written" in line for line in lines), lines
    assert keys_under(s3_storage, f"runs/{first.job.id}-train") == []  # nor its state
    (owner,) = taken_over
    assert owner is not None and owner.token > first.token
    saved = write_checkpoint(task(owner.token), store, run, model, optimizer, 6, "{}", 2,
                             lines.append)  # fmt: skip
    assert saved is not None and check(saved) == 6 and checkpoint_folders(run) == [saved]


def digits_npz() -> bytes:
    x, y = load_digits(return_X_y=True)
    buffer = io.BytesIO()
    np.savez(buffer, x=x.astype(np.float32), y=y.astype(np.int64))
    return buffer.getvalue()


def test_an_upload_is_stored_in_the_bucket_and_deleted_from_it(
    s3_client: TestClient, s3_settings: Settings
) -> None:
    storage = ObjectStorage(s3_settings.storage_root)
    response = s3_client.post("/v1/datasets", content=digits_npz(), params={"name": "digits"})
    assert response.status_code == 201, response.text
    dataset = response.json()["id"]
    assert keys_under(storage, "datasets") == [f"{dataset}.json", f"{dataset}.npz"]
    assert os.listdir(storage.incoming) == [] and os.listdir(storage.scratch / "datasets") == []
    facts = storage.stored_facts(dataset)
    assert facts is not None and facts.shape == (1797, 64)
    again = s3_client.post("/v1/datasets", content=digits_npz())
    assert again.status_code == 200 and again.json()["id"] == dataset  # content-addressed

    assert s3_client.delete(f"/v1/datasets/{dataset}").status_code == 204
    assert keys_under(storage, "datasets") == []


@pytest.fixture
def s3_dispatcher(
    store: JobStore, s3_settings: Settings, ray_address: str, one_group_pool: GroupPool
) -> Iterator[Dispatcher]:
    storage = ObjectStorage(s3_settings.storage_root)
    running = make_dispatcher(store, storage, s3_settings, ray_address,  # type: ignore[arg-type]
                              pool=one_group_pool)  # fmt: skip
    thread = threading.Thread(target=running.run_forever, daemon=True)
    thread.start()
    yield running
    running.stop()
    thread.join(timeout=60)


@pytest.mark.ray
def test_a_job_on_an_upload_in_the_bucket_trains_and_serves_its_encoder_from_there(
    s3_client: TestClient, store: JobStore, s3_settings: Settings, s3_dispatcher: Dispatcher,
    tmp_path: Path,
) -> None:  # fmt: skip
    """(A rank killed mid-training on this storage resumes from its checkpoint in the bucket:
    tests/e2e/test_two_nodes.py, where the rank's node is lost.)"""
    storage = ObjectStorage(s3_settings.storage_root)
    dataset = s3_client.post("/v1/datasets", content=digits_npz()).json()["id"]
    spec: dict[str, Any] = digits_spec(epochs=6, checkpoint_every=2, checkpoints_to_keep=2)
    spec["data"]["dataset"] = dataset
    job_id = s3_client.post("/v1/jobs", json=spec).json()["id"]
    job = finished(s3_client, job_id)
    assert job["state"] == "succeeded", (job["error"], job.get("error_tail"))

    # Trained on the upload, read from the bucket; its checkpoints and log are there, pruned
    # to the newest two (no renames: each is a folder of its own, its manifest written last).
    log = s3_client.get(f"/v1/jobs/{job_id}/logs", params={"stage": "train"}).text
    assert "resume: no whole checkpoint, from epoch 0" in log, log
    run = f"runs/{job_id}-train"
    manifests = [k for k in keys_under(storage, run) if k.endswith("/manifest.json")]
    assert [m[: len("checkpoint_000003")] for m in manifests] == [
        "checkpoint_000003", "checkpoint_000005",
    ], manifests  # fmt: skip
    assert latest_valid_checkpoint(storage.location(run), None) == storage.location(
        f"{run}/{manifests[-1].split('/')[0]}"
    )

    # The encoder comes through the API from the bucket, byte for byte, and runs.
    response = s3_client.get(f"/v1/jobs/{job_id}/encoder")
    assert response.status_code == 200
    stored = locations.read_bytes(storage.location(f"{job['result']['folder']}/encoder.pt"))
    assert response.content == stored
    assert response.headers["content-length"] == str(len(stored))
    (tmp_path / "encoder.pt").write_bytes(response.content)
    encoder = torch.jit.load(str(tmp_path / "encoder.pt"))
    codes = encoder(torch.from_numpy(load_digits().data[:5].astype(np.float32)))
    assert codes.shape == (5, 16)
    lines = s3_client.get(f"/v1/jobs/{job_id}/artifacts/metrics.jsonl").text.splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(6))

    # Interpolation decodes from the job's weights, copied from the bucket for the request.
    line = s3_client.post(f"/v1/jobs/{job_id}/interpolate", json={"a": 0, "b": 1, "steps": 3})
    assert line.status_code == 200 and len(line.json()["codes"]) == 3, line.text

    # A stale runner's attempt folder goes in the janitor's sweep; the named one stays.
    stale = storage.location(f"jobs/{job_id}/attempt-99/encoder.pt")
    locations.write_bytes(stale, b"left by a runner that lost its lease")
    swept = sweep(store, storage)
    assert swept.stale_attempts == 1 and locations.size_of(stale) is None
    assert s3_client.get(f"/v1/jobs/{job_id}/encoder").content == stored

    # What the service keeps in the bucket, it deletes from it.
    assert s3_client.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert keys_under(storage, f"jobs/{job_id}") == [] and keys_under(storage, run) == []


def test_an_unreachable_store_is_a_503_that_says_so_and_leaves_nothing_behind(
    s3_settings: Settings, store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing there
    storage = ObjectStorage(s3_settings.storage_root)
    with TestClient(create_app(s3_settings)) as client:
        response = client.post("/v1/datasets", content=digits_npz())
    assert response.status_code == 503, response.text
    assert response.json()["detail"].startswith("the storage is unavailable: ")
    assert response.headers["retry-after"] == "5"
    assert os.listdir(storage.incoming) == [] and os.listdir(storage.scratch / "datasets") == []
    assert store.datasets.list("default") == []  # no index entry for bytes never stored


def test_a_download_streams_from_the_bucket_without_holding_the_file(
    s3_settings: Settings, store: JobStore
) -> None:
    storage = ObjectStorage(s3_settings.storage_root)
    big = os.urandom(1 << 20) * 12  # 12 MiB
    job = succeeded_job(store, storage, artifacts=["big.bin"], contents={"big.bin": big})
    del big
    # A real server (TestClient gathers a whole body before it answers) and a client that
    # keeps no chunk: what is traced is what serving the file holds.
    with serve(create_app(s3_settings)) as url, httpx.Client(base_url=url) as http:
        tracemalloc.start()
        try:
            received, digest = 0, hashlib.sha256()
            with http.stream("GET", f"/v1/jobs/{job.id}/artifacts/big.bin") as response:
                assert response.status_code == 200
                assert response.headers["content-length"] == str(12 << 20)
                for chunk in response.iter_bytes():
                    received += len(chunk)
                    digest.update(chunk)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    stored = locations.read_bytes(storage.artifact(job, "big.bin"))
    assert received == len(stored) and digest.digest() == hashlib.sha256(stored).digest()
    print(f"12 MiB download from the bucket: peak {peak / 2**20:.1f} MiB of Python memory")
    assert peak < 6 * 2**20, peak  # chunks of 1 MiB in flight, never the whole file

"""Artifacts with folders in their names (the TensorBoard event files) are served over real
HTTP, written plainly or with `%2F` as the Python client sends them; a `..` or a folder
that is not itself a listed name reaches nothing."""

import secrets
from pathlib import Path

from aetrain import Client
from service.app import create_app
from shared.jobs import JobRecord, JobState
from shared.settings import Settings
from shared.specs import parse_job_spec
from shared.storage import LocalStorage
from shared.store import JobStore
from tests.service.helpers import artifact_bytes, serve
from tests.service.test_traversal import get, wire
from tests.specs import digits_spec

EVENTS = "tensorboard/train/events.out.tfevents.train"
ARTIFACTS = ["encoder.pt", "curves.png", EVENTS, "result.json"]


def succeeded_with_folders(store: JobStore, storage: LocalStorage) -> JobRecord:
    job, _ = store.submit(JobRecord.for_spec(parse_job_spec(digits_spec()), tenant="default"))
    claim = store.claim("test-runner", lease_ttl_s=30.0, block_ms=50)
    assert claim is not None and claim.job.id == job.id
    folder = storage.attempt_folder(job.id, claim.token)
    for name in ARTIFACTS:
        path = storage.root / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(artifact_bytes(job.id, name))
    result = {"artifacts": ARTIFACTS, "folder": folder, "metrics": {"val_mse": 0.01}}
    return store.finish(claim, JobState.SUCCEEDED, result=result)


def test_event_files_are_served_by_their_listed_names_and_nothing_past_them(
    settings: Settings, store: JobStore, storage: LocalStorage, tmp_path: Path
) -> None:
    job = succeeded_with_folders(store, storage)
    canary = f"CANARY-{secrets.token_hex(16)}".encode()
    folder = storage.root / job.result["folder"]  # type: ignore[index]
    (folder / "tensorboard" / "canary.txt").write_bytes(canary)  # beside, never listed
    (storage.root / "canary.txt").write_bytes(canary)
    prefix = f"/v1/jobs/{job.id}/artifacts/"
    with serve(create_app(settings)) as base:
        expected = artifact_bytes(job.id, EVENTS)
        assert get(base, prefix + EVENTS) == (200, expected)
        assert get(base, prefix + EVENTS.replace("/", "%2F")) == (200, expected)
        with Client(base) as client:
            saved = client.download(job.id, EVENTS, tmp_path)
            assert saved.name == "events.out.tfevents.train"
            assert saved.read_bytes() == expected
            assert EVENTS in client.result(job.id)["artifacts"]

        for name in [
            "tensorboard",
            "tensorboard/",
            "tensorboard/train",
            "tensorboard/train/",
            "tensorboard/canary.txt",
            "tensorboard/train/../canary.txt",
            "tensorboard/train/../../../../canary.txt",
            "tensorboard%2ftrain%2f..%2f..%2f..%2f..%2fcanary.txt",
            "tensorboard/train/../../curves.png",  # a listed file, but not by this name
            f"{EVENTS}/..",
            f"{EVENTS}/../../../../../../canary.txt",
            f"./{EVENTS}",
            "tensorboard//train/events.out.tfevents.train",
            EVENTS.upper(),
            "/" + EVENTS,
        ]:
            status, body = get(base, prefix + wire(name))
            assert status in (400, 404), (name, status)
            assert canary not in body, name

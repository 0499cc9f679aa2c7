"""Storage: artifacts are served only by names from a finished job's own list, inside the root."""

import re
from pathlib import Path
from typing import Any

import pytest

from shared.errors import ArtifactNotFound, ResultNotReady
from shared.jobs import JobRecord, JobState, advance
from shared.object_storage import ObjectStorage
from shared.specs import parse_job_spec
from shared.storage import LocalStorage, open_storage
from tests.specs import digits_spec

ARTIFACTS = ["encoder.pt", "encoder.safetensors", "metrics.json"]


def queued_job() -> JobRecord:
    return JobRecord.for_spec(parse_job_spec(digits_spec()))


def succeeded(storage: LocalStorage, artifacts: list[str], folder: str | None = None) -> JobRecord:
    """A succeeded job whose artifact folder exists with one file per listed plain name."""
    job = queued_job()
    folder = folder if folder is not None else storage.attempt_folder(job.id, 1)
    result: dict[str, Any] = {"folder": folder, "artifacts": artifacts, "metrics": {"loss": 0.1}}
    (storage.root / storage.attempt_folder(job.id, 1)).mkdir(parents=True, exist_ok=True)
    for name in artifacts:
        if "/" not in name and name not in ("", ".", ".."):
            (storage.root / folder / name).write_bytes(b"artifact " + name.encode())
    return advance(advance(job, JobState.RUNNING), JobState.SUCCEEDED, result=result)


def assert_inside(storage: LocalStorage, path: Path) -> None:
    assert path.resolve().is_relative_to(storage.root)


def test_a_listed_artifact_is_served_from_the_jobs_folder(storage: LocalStorage) -> None:
    job = succeeded(storage, ARTIFACTS)
    for name in ARTIFACTS:
        path = storage.artifact_path(job, name)
        assert path == storage.root / "jobs" / job.id / "attempt-1" / name
        assert path.read_bytes() == b"artifact " + name.encode()
        assert_inside(storage, path)


def test_a_name_not_in_the_list_is_not_found_even_if_the_file_exists(storage: LocalStorage) -> None:
    job = succeeded(storage, ["encoder.pt"])
    folder = storage.root / storage.attempt_folder(job.id, 1)
    (folder / "secret.txt").write_text("left by someone")
    with pytest.raises(ArtifactNotFound) as info:
        storage.artifact_path(job, "secret.txt")
    assert (info.value.job_id, info.value.name) == (job.id, "secret.txt")


@pytest.mark.parametrize("name", ["../x", "../../x", "./encoder.pt", "encoder.pt/", ""])
def test_relative_tricks_are_not_found(storage: LocalStorage, name: str) -> None:
    job = succeeded(storage, ["encoder.pt"])
    folder = storage.root / storage.attempt_folder(job.id, 1)
    (folder.parent / "x").write_text("a sibling of the attempt folder")
    (storage.root / "jobs" / "x").write_text("in the jobs folder")
    with pytest.raises(ArtifactNotFound):
        storage.artifact_path(job, name)


def test_an_absolute_path_is_not_found(storage: LocalStorage, tmp_path: Path) -> None:
    job = succeeded(storage, ["encoder.pt"])
    outside = tmp_path / "outside.txt"
    outside.write_text("not an artifact")
    inside = storage.root / storage.attempt_folder(job.id, 1) / "encoder.pt"
    for name in (str(outside), str(inside), "/etc/passwd"):
        with pytest.raises(ArtifactNotFound):
            storage.artifact_path(job, name)


def test_a_listed_artifact_whose_file_is_missing_is_not_found(storage: LocalStorage) -> None:
    job = succeeded(storage, ["encoder.pt"])
    (storage.root / storage.attempt_folder(job.id, 1) / "encoder.pt").unlink()
    with pytest.raises(ArtifactNotFound):
        storage.artifact_path(job, "encoder.pt")


def test_a_listed_name_that_is_a_folder_is_not_found(storage: LocalStorage) -> None:
    job = succeeded(storage, ["encoder.pt", "checkpoints"])
    (storage.root / storage.attempt_folder(job.id, 1) / "checkpoints").unlink()
    (storage.root / storage.attempt_folder(job.id, 1) / "checkpoints").mkdir()
    with pytest.raises(ArtifactNotFound):
        storage.artifact_path(job, "checkpoints")


def test_unfinished_jobs_have_no_artifacts(storage: LocalStorage) -> None:
    queued = queued_job()
    running = advance(queued, JobState.RUNNING)
    # files already on disk do not make an unfinished job's result ready
    folder = storage.root / storage.attempt_folder(queued.id, 1)
    folder.mkdir(parents=True)
    (folder / "encoder.pt").write_bytes(b"partial")
    for job in (queued, running):
        with pytest.raises(ResultNotReady) as info:
            storage.artifact_path(job, "encoder.pt")
        assert info.value.state == job.state


@pytest.mark.parametrize("state", [JobState.FAILED, JobState.CANCELLED])
def test_jobs_that_did_not_succeed_have_no_artifacts(
    storage: LocalStorage, state: JobState
) -> None:
    job = queued_job()
    result = {"folder": storage.attempt_folder(job.id, 1), "artifacts": ["encoder.pt"]}
    folder = storage.root / storage.attempt_folder(job.id, 1)
    folder.mkdir(parents=True)
    (folder / "encoder.pt").write_bytes(b"partial")
    done = advance(advance(job, JobState.RUNNING), state, error="worker died", result=result)
    with pytest.raises(ResultNotReady) as info:
        storage.artifact_path(done, "encoder.pt")
    assert "worker died" in str(info.value)


def test_a_succeeded_job_without_a_result_is_not_ready(storage: LocalStorage) -> None:
    job = advance(advance(queued_job(), JobState.RUNNING), JobState.SUCCEEDED)
    with pytest.raises(ResultNotReady):
        storage.artifact_path(job, "encoder.pt")


# A job's artifact list is written by a runner; whatever it holds, no path outside the root
# may come back.


@pytest.mark.parametrize(
    "bad_name",
    ["../../../../outside.txt", "../../../../storage/../outside.txt"],
)
def test_a_listed_name_that_climbs_out_of_the_root_is_refused(
    storage: LocalStorage, tmp_path: Path, bad_name: str
) -> None:
    (tmp_path / "outside.txt").write_text("outside the storage root")
    job = succeeded(storage, ["encoder.pt", bad_name])
    escaped = storage.root / job.result["folder"] / bad_name  # type: ignore[index]
    assert escaped.is_file() and not escaped.resolve().is_relative_to(storage.root)
    with pytest.raises(ArtifactNotFound):
        storage.artifact_path(job, bad_name)


def test_a_listed_absolute_name_is_refused(storage: LocalStorage, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("outside the storage root")
    job = succeeded(storage, ["encoder.pt", str(outside)])
    with pytest.raises(ArtifactNotFound):
        storage.artifact_path(job, str(outside))


def test_a_folder_that_climbs_out_of_the_root_is_refused(
    storage: LocalStorage, tmp_path: Path
) -> None:
    (tmp_path / "encoder.pt").write_text("outside the storage root")
    job = succeeded(storage, [])
    job = job.model_copy(update={"result": {"folder": "..", "artifacts": ["encoder.pt"]}})
    with pytest.raises(ArtifactNotFound):
        storage.artifact_path(job, "encoder.pt")


def test_a_listed_artifact_that_links_out_of_the_root_is_refused(
    storage: LocalStorage, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("outside the storage root")
    job = succeeded(storage, ["encoder.pt"])
    link = storage.root / storage.attempt_folder(job.id, 1) / "encoder.pt"
    link.unlink()
    link.symlink_to(outside)
    with pytest.raises(ArtifactNotFound):
        storage.artifact_path(job, "encoder.pt")


@pytest.mark.parametrize(
    ("root", "refusal"),
    [
        ("gs://bucket/aetrain", "a local or mounted path, or s3://bucket/prefix"),
        ("s3://", "write s3://bucket or s3://bucket/prefix"),
        ("s3://bucket/a?versionId=1", "write s3://bucket or s3://bucket/prefix"),
        ("s3://bucket/a//b", "empty, '.' or '..' part"),
        ("s3://bucket/a/../b", "empty, '.' or '..' part"),
    ],
)
def test_a_url_other_than_an_s3_bucket_and_prefix_is_refused(root: str, refusal: str) -> None:
    with pytest.raises(ValueError, match=re.escape(refusal)):
        open_storage(root)


def test_a_url_opens_object_storage_and_a_path_a_local_one(tmp_path: Path) -> None:
    remote = open_storage("s3://bucket/aetrain/")
    assert isinstance(remote, ObjectStorage)
    assert remote.location("runs/j1-train") == "s3://bucket/aetrain/runs/j1-train"
    assert remote.run_location("j1", "train") == "s3://bucket/aetrain/runs/j1-train"
    local = open_storage(str(tmp_path))
    assert isinstance(local, LocalStorage)
    assert local.location("datasets") == str(tmp_path.resolve() / "datasets")
    with pytest.raises(ValueError, match="is a URL"):
        LocalStorage("s3://bucket/aetrain")


def test_the_root_is_absolute_and_resolved(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path / "a" / ".." / "storage"))
    assert storage.root == (tmp_path / "storage").resolve()
    assert storage.root.is_absolute()
    assert storage.run_name("j1", "train") == "j1-train"
    assert storage.attempt_folder("j1", 3) == "jobs/j1/attempt-3"


@pytest.mark.parametrize("root", ["local", "s3://bucket/aetrain"])
def test_records_keep_locations_relative_to_the_root_so_the_storage_may_move(
    root: str, tmp_path: Path
) -> None:
    storage = open_storage(str(tmp_path / "old") if root == "local" else root)
    moved = open_storage(str(tmp_path / "new") if root == "local" else "s3://other/prefix")
    checkpoint = storage.location("runs/j1-train/checkpoint_000004")
    kept = storage.relative_name(checkpoint)
    assert kept == "runs/j1-train/checkpoint_000004"
    assert storage.locate(kept) == checkpoint
    assert moved.locate(kept) == moved.location("runs/j1-train/checkpoint_000004")
    # Records written before names were relative keep working where they were written.
    assert moved.locate(checkpoint) == checkpoint
    assert storage.relative_name("/elsewhere/x") == "/elsewhere/x"

"""The janitor on a real Redis and a real folder: leftovers made by hand, next to fresh ones
within the grace period and everything a live job needs; exactly the stale ones go."""

import os
import time
from pathlib import Path

import pytest

from shared.jobs import JobRecord, JobState, new_job_id
from shared.quotas import Quotas, job_item
from shared.specs import parse_job_spec
from shared.storage import LocalStorage
from shared.store import JobStore
from tests.service.helpers import succeeded_job
from tests.specs import digits_spec
from workers.janitor import GRACE_S, PART_AGE_S, sweep

pytestmark = pytest.mark.timeout(60)

HOUR = 3600.0


def make(path: Path, age_s: float = 0.0, content: bytes = b"x") -> Path:
    """A file (or, for a name without a suffix, a folder with one file) last touched age_s ago."""
    if path.suffix:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    else:
        (path / "checkpoint_000000").mkdir(parents=True, exist_ok=True)
        (path / "checkpoint_000000" / "state.pt").write_bytes(content)
    then = time.time() - age_s
    os.utime(path, (then, then), follow_symlinks=False)
    return path


def every_path(storage: LocalStorage) -> set[str]:
    return {str(p.relative_to(storage.root)) for p in storage.root.rglob("*")}


def job_id_made(seconds_ago: float) -> str:
    """A job id as new_job_id makes them, from some time ago."""
    fresh = new_job_id()
    return f"j{int((time.time() - seconds_ago) * 1000):012x}{fresh[-8:]}"


def test_exactly_the_stale_leftovers_go(store: JobStore, storage: LocalStorage) -> None:
    finished = succeeded_job(store, storage)  # names its attempt folder
    deleted = succeeded_job(store, storage, tenant="other")
    store.delete(deleted.id, tenant="other")
    queued, _ = store.submit(JobRecord.for_spec(parse_job_spec(digits_spec())))
    gone, young = job_id_made(2 * HOUR), new_job_id()

    assert finished.result is not None
    named = storage.root / finished.result["folder"]
    keep = [
        make(named / "encoder.pt", age_s=HOUR),
        make(storage.job_folder(finished.id) / "logs" / "train-attempt-1.log", age_s=HOUR),
        make(storage.runs_root / f"{finished.id}-train", age_s=HOUR),
        make(storage.root / storage.attempt_folder(queued.id, 1) / "a.pt", age_s=HOUR),
        make(storage.runs_root / f"{queued.id}-train", age_s=HOUR),
        make(storage.incoming / "young.part", age_s=PART_AGE_S - 60),
        make(storage.job_folder(young) / "attempt-1" / "a.pt"),  # within the grace period
        make(storage.runs_root / f"{young}-train"),
        make(storage.datasets_root / "ds-0123456789abcdef01234567.npz", age_s=HOUR),
        make(storage.jobs_root / "notes" / "readme.txt", age_s=HOUR),  # not named like a job
        make(storage.runs_root / "scratch", age_s=HOUR),
    ]
    stale = [  # each goes whole: a file, or a folder with everything in it
        make(storage.incoming / "old.part", age_s=PART_AGE_S + 60),
        make(storage.datasets_root / ".ds-x.npz.1.part", age_s=2 * HOUR),  # an atomic write
        make(storage.root / storage.attempt_folder(finished.id, 99) / "a.pt").parent,
        make(storage.runs_root / f"{deleted.id}-train", age_s=HOUR),
        make(storage.runs_root / f"{deleted.id}-pretrain-layer1", age_s=HOUR),
        make(storage.job_folder(deleted.id) / "logs" / "t.log").parent.parent,
        make(storage.job_folder(gone) / "attempt-1" / "a.pt").parent.parent,
    ]
    for folder in stale[2:]:
        os.utime(folder, (time.time() - HOUR,) * 2)  # made by hand just now
    before = every_path(storage)
    expected = {p for p in before for s in stale
                if p == rel(storage, s) or p.startswith(rel(storage, s) + "/")}  # fmt: skip

    freed = sum((storage.root / p).stat().st_size for p in expected
                if (storage.root / p).is_file())  # fmt: skip

    done = sweep(store, storage)

    assert before - every_path(storage) == expected
    assert all(path.exists() for path in keep)
    assert (done.part_files, done.stale_attempts, done.job_folders, done.run_folders) == (
        2, 1, 2, 2)  # fmt: skip
    assert done.bytes_freed == freed
    assert sweep(store, storage).bytes_freed == 0  # nothing left to find


def rel(storage: LocalStorage, path: Path) -> str:
    return str(path.relative_to(storage.root))


def test_a_failed_or_cancelled_job_keeps_no_attempt_folder(
    store: JobStore, storage: LocalStorage
) -> None:
    job, _ = store.submit(JobRecord.for_spec(parse_job_spec(digits_spec())))
    claim = store.claim("runner", lease_ttl_s=30.0, block_ms=50)
    assert claim is not None
    attempt = make(storage.root / storage.attempt_folder(job.id, claim.token) / "a.pt")
    store.request_cancel(job.id)
    assert sweep(store, storage).stale_attempts == 0  # running still: its runner writes there
    store.finish(claim, JobState.CANCELLED)
    assert sweep(store, storage).stale_attempts == 1 and not attempt.exists()


def test_nothing_goes_for_a_missing_record_when_redis_knows_no_tenant(
    store: JobStore, storage: LocalStorage
) -> None:
    orphan = make(storage.job_folder(job_id_made(HOUR)) / "attempt-1" / "a.pt", age_s=HOUR)
    os.utime(orphan.parent.parent, (time.time() - HOUR,) * 2)
    run = make(storage.runs_root / f"{job_id_made(HOUR)}-train", age_s=HOUR)
    done = sweep(store, storage)  # a new or wiped Redis: every file would look orphaned
    assert orphan.exists() and run.exists() and done.job_folders == done.run_folders == 0


def test_the_ledger_lets_go_of_gone_jobs_and_of_jobs_that_never_started(
    store: JobStore, storage: LocalStorage
) -> None:
    quotas = Quotas(store.redis, store.keys)
    finished = succeeded_job(store, storage)
    cancelled, _ = store.submit(JobRecord.for_spec(parse_job_spec(digits_spec())))
    store.request_cancel(cancelled.id)
    old_gone, young_gone = job_id_made(GRACE_S + 60), new_job_id()  # young: being submitted
    for job_id in [finished.id, cancelled.id, old_gone, young_gone]:
        quotas.charge("default", job_item(job_id), 100)
    quotas.charge("default", "dataset:ds-0123456789abcdef01234567", 7)

    done = sweep(store, storage)

    assert done.ledger_entries == 2
    assert quotas.ledger("default") == {
        job_item(finished.id): 100,  # its files are there until it is deleted or expires
        job_item(young_gone): 100,
        "dataset:ds-0123456789abcdef01234567": 7,  # released by DELETE /v1/datasets/{id}
    }


def test_expired_index_entries_are_pruned(store: JobStore, storage: LocalStorage) -> None:
    short = JobStore(store.redis, store.prefix, retention_s=1)
    job, _ = short.submit(JobRecord.for_spec(parse_job_spec(digits_spec())))
    short.request_cancel(job.id)
    time.sleep(1.1)
    assert store.redis.zcard(store.keys.index("default")) == 1
    assert sweep(store, storage).index_entries == 1
    assert store.redis.zcard(store.keys.index("default")) == 0


def test_a_sweep_never_follows_a_link_out_of_the_root(
    store: JobStore, storage: LocalStorage
) -> None:
    succeeded_job(store, storage)  # a tenant: Redis is not empty
    outside = storage.root.parent / "outside"
    make(outside / "precious.pt")
    orphan = storage.job_folder(job_id_made(HOUR))
    make(orphan / "attempt-1" / "a.pt")
    (orphan / "attempt-1" / "link").symlink_to(outside)
    run = storage.runs_root / f"{job_id_made(HOUR)}-train"
    storage.runs_root.mkdir(parents=True)
    run.symlink_to(outside)
    os.utime(run, (time.time() - HOUR,) * 2, follow_symlinks=False)
    make(storage.incoming / "x.part", age_s=2 * HOUR)
    (storage.incoming / "y.part").symlink_to(outside / "precious.pt")
    os.utime(storage.incoming / "y.part", (time.time() - 2 * HOUR,) * 2, follow_symlinks=False)
    os.utime(orphan, (time.time() - HOUR,) * 2)

    done = sweep(store, storage)

    assert (outside / "precious.pt").exists()
    assert not orphan.exists() and list(storage.runs_root.iterdir()) == []
    assert list(storage.incoming.iterdir()) == []
    assert (done.job_folders, done.run_folders, done.part_files) == (1, 1, 2)

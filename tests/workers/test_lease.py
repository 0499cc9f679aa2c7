"""A runner's writes through Redis errors and after its lease is gone, on a real redis-server.

A Redis that refuses writes for a moment (out of memory) while a job finishes must not leave
the job to run again; a runner whose lease is gone must not prune the job's checkpoints.
"""

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import torch
from torch import nn

from shared.claims import Claim
from shared.errors import LeaseLost
from shared.group_channel import StageTask
from shared.jobs import JobRecord, JobState
from shared.specs import parse_job_spec
from shared.storage import LocalStorage
from shared.store import JobStore
from tests.specs import digits_spec
from workers.checkpoints import check, checkpoint_folders, save_checkpoint
from workers.dispatcher import Dispatcher
from workers.lease import LeaseKeeper
from workers.train_loop import write_checkpoint

pytestmark = pytest.mark.timeout(60)

TTL_S = 3.0


def claimed(store: JobStore, consumer: str = "d1") -> Claim:
    store.submit(JobRecord.for_spec(parse_job_spec(digits_spec())))
    claim = store.claim(consumer, TTL_S, block_ms=100)
    assert claim is not None
    return claim


Refuse = Callable[[float], None]


@pytest.fixture
def writes_refused_for(store: JobStore) -> Iterator[Refuse]:
    """Call with seconds: Redis refuses writes (OOM) from now for that long."""
    timers: list[threading.Timer] = []

    def refuse(seconds: float) -> None:
        store.redis.config_set("maxmemory", 1)  # noeviction: every write that adds memory fails
        timer = threading.Timer(seconds, store.redis.config_set, ("maxmemory", 0))
        timer.start()
        timers.append(timer)

    yield refuse
    for timer in timers:
        timer.cancel()
    store.redis.config_set("maxmemory", 0)


def test_the_lease_is_renewed_while_redis_refuses_writes(store: JobStore) -> None:
    claim = claimed(store)
    store.redis.config_set("maxmemory", 1)
    try:
        with pytest.raises(Exception, match="maxmemory"):
            store.redis.set("probe", "x")
        # PEXPIRE adds no memory, so the renewal script runs under OOM: an outage of writes
        # does not cost a runner its lease.
        assert store.heartbeat(claim.job.id, claim.token, TTL_S)
        assert store.holds_lease(claim.job.id, claim.token)
    finally:
        store.redis.config_set("maxmemory", 0)


def test_a_job_finished_while_redis_refuses_writes_succeeds_once_and_frees_its_lease(
    store: JobStore, storage: LocalStorage, redis_url: str, writes_refused_for: Refuse
) -> None:
    claim = claimed(store)
    job_id = claim.job.id
    dispatcher = Dispatcher(store, storage, redis_url, "unused", lease_ttl_s=TTL_S)
    with LeaseKeeper(store, job_id, claim.token, TTL_S) as lease:
        writes_refused_for(1.5)
        started = time.monotonic()
        finished = dispatcher._finish(claim, lease, JobState.SUCCEEDED, result={"metrics": {}})
        took = time.monotonic() - started
        assert not lease.lost.is_set()
    assert finished is not None and finished.state is JobState.SUCCEEDED
    assert took >= 1.4  # it waited the refusal out rather than dying at the first error
    job = store.get(job_id)
    assert job.state is JobState.SUCCEEDED and job.attempts == 1 and job.takeovers == 0
    assert not store.redis.exists(store.keys.lease(job_id))
    assert store.claim("d2", TTL_S, block_ms=300) is None  # nothing to run again
    assert store.get(job_id).attempts == 1


def test_a_job_given_back_while_redis_refuses_writes_is_queued_once(
    store: JobStore, storage: LocalStorage, redis_url: str, writes_refused_for: Refuse
) -> None:
    claim = claimed(store)
    dispatcher = Dispatcher(store, storage, redis_url, "unused", lease_ttl_s=TTL_S)
    with LeaseKeeper(store, claim.job.id, claim.token, TTL_S) as lease:
        writes_refused_for(1.0)
        back = dispatcher._give_back(claim, lease)
    assert back is not None and back.state is JobState.QUEUED
    assert store.queued_ids() == [claim.job.id]
    assert not store.redis.exists(store.keys.lease(claim.job.id))


def test_a_finish_after_the_lease_is_gone_is_refused_and_never_raises(
    store: JobStore, storage: LocalStorage, redis_url: str
) -> None:
    claim = claimed(store)
    dispatcher = Dispatcher(store, storage, redis_url, "unused", lease_ttl_s=TTL_S)
    with LeaseKeeper(store, claim.job.id, claim.token, TTL_S) as lease:
        store.redis.delete(store.keys.lease(claim.job.id))  # expired while it was frozen
        assert dispatcher._finish(claim, lease, JobState.SUCCEEDED, result={}) is None
    assert store.get(claim.job.id).state is JobState.RUNNING  # left to its next owner


def refused() -> None:
    raise redis.ConnectionError("Redis is down")


def test_a_write_is_retried_until_the_lease_keeper_gives_the_lease_up(store: JobStore) -> None:
    claim = claimed(store)
    with LeaseKeeper(store, claim.job.id, claim.token, TTL_S) as lease:
        threading.Timer(0.5, store.redis.delete, (store.keys.lease(claim.job.id),)).start()
        started = time.monotonic()
        with pytest.raises(LeaseLost):
            lease.retry(refused, "write")
    assert 0.5 < time.monotonic() - started < 0.5 + TTL_S / 5 + 1.0  # the next renewal


def test_a_write_refused_past_the_limit_raises_the_redis_error(store: JobStore) -> None:
    claim = claimed(store)
    with LeaseKeeper(store, claim.job.id, claim.token, TTL_S) as lease:
        with pytest.raises(redis.ConnectionError):
            lease.retry(refused, "write", limit_s=0.5)
        assert not lease.lost.is_set()


def checkpoints_in(run: Path, epochs: range) -> list[Path]:
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    folders = []
    for epoch in epochs:
        folder = run / f"checkpoint_2026-01-01_00-00-{epoch:02d}.000000"
        folder.mkdir(parents=True)
        save_checkpoint(folder, model, optimizer, epoch, "{}")
        folders.append(folder)
    return folders


def test_a_runner_whose_lease_is_gone_writes_and_prunes_no_checkpoint(
    store: JobStore, tmp_path: Path
) -> None:
    stale = claimed(store)
    job_id = stale.job.id
    store.redis.delete(store.keys.lease(job_id))  # it froze past its lease...
    # ...and the job was taken over, by an owner whose lease outlasts a loaded machine's
    # slowest checkpoint write
    owner = store.claim("d2", 60.0, block_ms=100)
    assert owner is not None and owner.token > stale.token
    run = tmp_path / "run"
    folders = checkpoints_in(run, range(6))
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def task(token: int) -> StageTask:
        return StageTask(seq=1, job_id=job_id, token=token, stage="train", spec={}, inputs={},
                         run_folder=str(run), datasets_root="", log_path="", metrics_cap=10,
                         max_failures=0, submitted_at=0.0)  # fmt: skip

    lines: list[str] = []
    assert write_checkpoint(task(stale.token), store, str(run), model, optimizer, 6, "{}", 1,
                            lines.append) is None  # fmt: skip
    # the new owner's resume point is intact
    assert checkpoint_folders(run) == [str(f) for f in folders]
    assert any("not written" in line for line in lines), lines
    saved = write_checkpoint(task(owner.token), store, str(run), model, optimizer, 6, "{}", 1,
                             lines.append)  # fmt: skip
    assert saved is not None and check(saved) == 6
    assert checkpoint_folders(run) == [saved]  # checkpoints_to_keep 1: the others went
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # no partial left

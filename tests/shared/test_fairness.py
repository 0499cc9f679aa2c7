"""Fair sharing between tenants, on a real redis-server: the next job comes from the tenant
that runs the fewest, whatever priorities and how many jobs another tenant queued; and a
stale runner cannot give back the grant of the runner that replaced it."""

import json
import time

import pytest

from shared.claims import Claim
from shared.jobs import JobRecord, JobState
from shared.specs import parse_job_spec
from shared.store import JobStore
from tests.specs import digits_spec

pytestmark = pytest.mark.timeout(60)


def submit(store: JobStore, tenant: str, priority: int = 0) -> JobRecord:
    spec = parse_job_spec({**digits_spec(), "priority": priority})
    job, created = store.submit(JobRecord.for_spec(spec, tenant=tenant))
    assert created
    time.sleep(0.002)  # ids sort by the millisecond: the next job is younger
    return job


def next_claim(store: JobStore) -> Claim:
    claim = store.claim("c1", lease_ttl_s=30.0, block_ms=50)
    assert claim is not None
    return claim


def test_a_flood_at_priority_9_does_not_starve_another_tenants_single_job(
    store: JobStore,
) -> None:
    flood = [submit(store, "alice", priority=9) for _ in range(30)]
    bob = submit(store, "bob", priority=0)
    first, second = next_claim(store), next_claim(store)
    assert first.job.id == flood[0].id  # nobody runs anything: the higher priority first
    assert second.job.id == bob.id  # alice runs one, bob none: bob's turn
    third = next_claim(store)
    assert third.job.id == flood[1].id  # bob's queue is empty: alice's next, in her order


def test_tenants_alternate_by_running_share(store: JobStore) -> None:
    for tenant in ("alice", "bob", "carol"):
        for _ in range(3):
            submit(store, tenant)
    claimed = [next_claim(store).job.tenant for _ in range(6)]
    # Each round gives every tenant one more running job before anyone gets a second.
    assert sorted(claimed[:3]) == ["alice", "bob", "carol"]
    assert sorted(claimed[3:]) == ["alice", "bob", "carol"]


def test_a_finished_job_frees_its_tenants_share(store: JobStore) -> None:
    a1, a2 = submit(store, "alice"), submit(store, "alice")
    running = next_claim(store)
    assert running.job.id == a1.id
    b1 = submit(store, "bob")
    store.finish(running, JobState.SUCCEEDED, result={})
    # Both run nothing now; alice was served last, so bob's turn, though a2 is older.
    assert next_claim(store).job.id == b1.id
    assert next_claim(store).job.id == a2.id
    assert store.queued_ids() == []
    assert store.redis.smembers(store.keys.waiting_tenants) <= {"alice", "bob"}
    store.claim("c1", lease_ttl_s=30.0, block_ms=10)  # finds nothing and drops empty tenants
    assert store.redis.smembers(store.keys.waiting_tenants) == set()


def test_within_a_tenant_priority_then_age(store: JobStore) -> None:
    low, high, high_later = submit(store, "alice", 1), submit(store, "alice", 5), submit(
        store, "alice", 5)  # fmt: skip
    assert store.queued_ids("alice") == [high.id, high_later.id, low.id]
    assert [next_claim(store).job.id for _ in range(3)] == [high.id, high_later.id, low.id]


def test_a_stale_runner_cannot_release_the_new_owners_grant(store: JobStore) -> None:
    job = submit(store, "alice")
    stale = store.claim("c1", lease_ttl_s=0.3, block_ms=50)
    assert stale is not None
    cluster = {"CPU": 2.0}
    assert store.scheduler.reserve(stale, "train", {"CPU": 1.0}, cluster) == "granted"
    store.redis.delete(store.keys.lease(job.id))  # the stale runner froze past its lease
    owner = next_claim(store)
    assert owner.job.id == job.id and owner.token > stale.token
    assert store.scheduler.reserve(owner, "train", {"CPU": 1.0}, cluster) == "granted"
    assert not store.scheduler.release(stale, "train")  # wakes up and tries to give it back
    assert store.scheduler.reserved() == ({"CPU": 1.0}, 0)
    assert store.scheduler.release(owner, "train")
    assert store.scheduler.reserved() == ({}, 0)


def test_a_stale_runner_that_asks_again_is_told_lost_and_changes_nothing(
    store: JobStore,
) -> None:
    job = submit(store, "alice")
    stale = store.claim("c1", lease_ttl_s=0.3, block_ms=50)
    assert stale is not None
    store.redis.delete(store.keys.lease(job.id))  # froze past its lease while waiting in line
    owner = next_claim(store)
    cluster = {"CPU": 1.0}
    # The new owner waiting for room, then granted.
    for need, answer in (({"CPU": 2.0}, "no room"), ({"CPU": 1.0}, "granted")):
        assert store.scheduler.reserve(owner, "train", need, cluster) == answer
        before = store.redis.hgetall(store.keys.scheduler)
        # Neither told that the new owner's grant is its own, nor replacing the owner's ask.
        assert store.scheduler.reserve(stale, "train", {"CPU": 1.0}, cluster) == "lost"
        assert store.redis.hgetall(store.keys.scheduler) == before
    (entry,) = store.redis.hvals(store.keys.scheduler)
    assert json.loads(entry)["token"] == str(owner.token)


def test_jobs_run_one_at_a_time_still_take_turns_between_tenants(store: JobStore) -> None:
    bob = [submit(store, "bob", priority=4) for _ in range(4)]
    carol = submit(store, "carol", priority=0)
    order = []
    for _ in range(3):  # one job at a time: nobody is running when the next is claimed
        claim = next_claim(store)
        order.append(claim.job.id)
        store.finish(claim, JobState.SUCCEEDED, result={})
    # Both run nothing at each claim; bob's higher priority wins the first turn only.
    assert order == [bob[0].id, carol.id, bob[1].id]

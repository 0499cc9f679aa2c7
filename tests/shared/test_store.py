"""JobStore on a real redis-server: submission, claims, leases and fencing, progress."""

import secrets
import threading
import time
from collections import Counter
from typing import Any, cast

import pytest

from shared.claims import Claim
from shared.errors import (
    IdempotencyConflict,
    InvalidTransition,
    JobNotFound,
    LeaseLost,
    RateLimited,
    TooManyJobs,
)
from shared.jobs import JobRecord, JobState, StageState
from shared.specs import parse_job_spec
from shared.store import JobStore, connect
from tests.specs import digits_spec

LONG_LEASE_S = 30.0
SHORT_LEASE_S = 0.6
BLOCK_MS = 50  # a claim that finds nothing returns after this


def new_job(tenant: str = "default", **training: Any) -> JobRecord:
    return JobRecord.for_spec(parse_job_spec(digits_spec(**training)), tenant=tenant)


def submitted(store: JobStore, tenant: str = "default") -> JobRecord:
    job, created = store.submit(new_job(tenant))
    assert created
    return job


def claim(store: JobStore, consumer: str = "c1", lease_ttl_s: float = LONG_LEASE_S) -> Claim:
    got = store.claim(consumer, lease_ttl_s, block_ms=BLOCK_MS)
    assert got is not None
    return got


def queue_length(store: JobStore) -> int:
    return len(store.queued_ids())


def pending(store: JobStore) -> int:
    """Jobs claimed and not finished: the ones a takeover would look at."""
    return int(store.redis.scard(store.keys.active))


def raw(store: JobStore, job_id: str) -> str | None:
    return cast(str | None, store.redis.get(f"{store.prefix}:job:{job_id}"))


def lease(store: JobStore, job_id: str) -> str | None:
    return cast(str | None, store.redis.get(f"{store.prefix}:lease:{job_id}"))


# -- submission and reads ---------------------------------------------------------------------


def test_submit_then_get_returns_the_same_record(store: JobStore) -> None:
    job = new_job()
    stored, created = store.submit(job)
    assert created and stored == job
    got = store.get(job.id)
    assert got == job
    assert got.state is JobState.QUEUED
    assert got.spec == job.spec


def test_get_of_an_unknown_job_or_another_tenants_job_is_not_found(store: JobStore) -> None:
    job = submitted(store, tenant="acme")
    with pytest.raises(JobNotFound):
        store.get("j000000000000deadbeef")
    with pytest.raises(JobNotFound):
        store.get(job.id, tenant="other")
    assert store.get(job.id, tenant="acme").id == job.id


def test_submit_enqueues_the_job_exactly_once(store: JobStore) -> None:
    job = submitted(store)
    assert store.queued_ids() == [job.id]


def test_jobs_start_by_priority_then_submission_time(store: JobStore) -> None:
    jobs = []
    for priority in [0, 5, 0, 9, 5]:
        job = JobRecord.for_spec(parse_job_spec({**digits_spec(), "priority": priority}))
        jobs.append(store.submit(job)[0])
        time.sleep(0.002)  # ids carry the submission time in milliseconds
    by_priority = [jobs[3], jobs[1], jobs[4], jobs[0], jobs[2]]
    assert store.queued_ids() == [j.id for j in by_priority]
    claimed = [claim(store).job.id for _ in jobs]
    assert claimed == [j.id for j in by_priority]
    assert queue_length(store) == 0 and pending(store) == len(jobs)


def test_a_job_given_back_keeps_its_place_before_younger_jobs(store: JobStore) -> None:
    first = submitted(store)
    got = claim(store)
    time.sleep(0.002)
    younger = submitted(store)
    store.give_back(got, "shutdown")
    assert store.queued_ids() == [first.id, younger.id]


def test_same_idempotency_key_and_spec_returns_the_first_job(store: JobStore) -> None:
    first, created = store.submit(new_job(), idempotency_key="key-1")
    assert created
    retry = new_job()
    again, created_again = store.submit(retry, idempotency_key="key-1")
    assert created_again is False
    assert again.id == first.id
    assert queue_length(store) == 1
    with pytest.raises(JobNotFound):
        store.get(retry.id)


def test_same_idempotency_key_with_another_spec_is_a_conflict(store: JobStore) -> None:
    first, _ = store.submit(new_job(), idempotency_key="key-1")
    other = new_job(epochs=7)
    with pytest.raises(IdempotencyConflict) as info:
        store.submit(other, idempotency_key="key-1")
    assert info.value.key == "key-1"
    assert queue_length(store) == 1
    with pytest.raises(JobNotFound):
        store.get(other.id)
    assert store.get(first.id).spec.training.epochs == 3


def test_idempotency_keys_are_per_tenant(store: JobStore) -> None:
    a, _ = store.submit(new_job("a"), idempotency_key="key-1")
    b, created = store.submit(new_job("b", epochs=9), idempotency_key="key-1")
    assert created and b.id != a.id
    assert queue_length(store) == 2


def submit_spaced(store: JobStore, count: int, tenant: str = "default") -> list[JobRecord]:
    jobs = []
    for _ in range(count):
        jobs.append(submitted(store, tenant))
        time.sleep(0.002)  # ids resolve milliseconds
    return jobs


def test_list_jobs_is_newest_first(store: JobStore) -> None:
    jobs = submit_spaced(store, 4)
    submitted(store, tenant="other")
    listed, cursor = store.list_jobs("default")
    assert [j.id for j in listed] == [j.id for j in reversed(jobs)]
    assert cursor is None
    created = [j.created_at for j in listed]
    assert created == sorted(created, reverse=True)


def test_list_jobs_filters_by_state(store: JobStore) -> None:
    jobs = submit_spaced(store, 5)
    for job in jobs[1::2]:
        store.request_cancel(job.id)
    cancelled, _ = store.list_jobs("default", state=JobState.CANCELLED)
    queued, _ = store.list_jobs("default", state=JobState.QUEUED)
    assert [j.id for j in cancelled] == [jobs[3].id, jobs[1].id]
    assert [j.id for j in queued] == [jobs[4].id, jobs[2].id, jobs[0].id]
    assert store.list_jobs("default", state=JobState.RUNNING) == ([], None)


def test_cursor_pages_cover_every_job_exactly_once(store: JobStore) -> None:
    jobs = submit_spaced(store, 7)
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        page, cursor = store.list_jobs("default", cursor=cursor, limit=3)
        pages.append([j.id for j in page])
        assert len(page) <= 3
        if cursor is None:
            break
        assert len(pages) < 10, "pagination does not end"
    assert [len(p) for p in pages] == [3, 3, 1]
    seen = [job_id for page in pages for job_id in page]
    assert seen == [j.id for j in reversed(jobs)]


def test_cursor_pages_with_a_state_filter(store: JobStore) -> None:
    jobs = submit_spaced(store, 7)
    for job in jobs[::3]:  # 0, 3, 6
        store.request_cancel(job.id)
    expected = [j.id for j in reversed(jobs) if j not in jobs[::3]]
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(10):
        page, cursor = store.list_jobs("default", state=JobState.QUEUED, cursor=cursor, limit=3)
        assert all(j.state is JobState.QUEUED for j in page)
        seen += [j.id for j in page]
        if cursor is None:
            break
    assert cursor is None
    assert seen == expected


# -- claims -----------------------------------------------------------------------------------


def test_claim_runs_the_job_with_a_lease_and_a_token(store: JobStore) -> None:
    job = submitted(store)
    got = claim(store)
    assert got.job.id == job.id
    assert got.job.state is JobState.RUNNING and got.job.attempts == 1
    assert got.job.started_at is not None
    assert got.token == 1
    assert lease(store, job.id) == "1"
    assert store.get(job.id).state is JobState.RUNNING
    assert pending(store) == 1


def test_claim_with_an_empty_queue_returns_none(store: JobStore) -> None:
    assert store.claim("c1", LONG_LEASE_S, block_ms=BLOCK_MS) is None


def test_two_claims_of_one_job_have_exactly_one_winner(store: JobStore) -> None:
    job = submitted(store)
    first = store.claim("c1", LONG_LEASE_S, block_ms=BLOCK_MS)
    second = store.claim("c2", LONG_LEASE_S, block_ms=BLOCK_MS)
    assert first is not None and first.job.id == job.id
    assert second is None
    assert store.get(job.id).attempts == 1


def test_a_live_lease_keeps_a_redelivered_message_from_a_second_runner(store: JobStore) -> None:
    job = submitted(store)
    first = claim(store, "c1", LONG_LEASE_S)
    time.sleep(0.1)
    # with a short lease of its own, c2 sees c1's message as idle and reclaims it ...
    assert store.claim("c2", 0.05, block_ms=BLOCK_MS) is None
    # ... but c1's lease is live, so the job stays c1's
    assert lease(store, job.id) == str(first.token)
    after = store.get(job.id)
    assert after.attempts == 1 and after.warnings == []


def test_concurrent_claims_of_one_job_have_exactly_one_winner(
    store: JobStore, redis_url: str
) -> None:
    submitted(store)
    stores = [JobStore(connect(redis_url), store.prefix) for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    results: list[Claim | None] = [None] * len(stores)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = stores[i].claim(f"c{i}", LONG_LEASE_S, block_ms=200)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    for s in stores:
        s.redis.close()
    winners = [r for r in results if r is not None]
    assert len(winners) == 1


def test_claim_of_a_job_cancelled_while_queued_returns_none(store: JobStore) -> None:
    job = submitted(store)
    cancelled = store.request_cancel(job.id)
    assert cancelled.state is JobState.CANCELLED
    assert cancelled.finished_at is not None
    assert store.claim("c1", LONG_LEASE_S, block_ms=BLOCK_MS) is None
    assert pending(store) == 0
    assert lease(store, job.id) is None
    assert store.get(job.id).state is JobState.CANCELLED


# -- leases and fencing -----------------------------------------------------------------------


def test_heartbeat_renews_only_with_the_right_token(store: JobStore) -> None:
    job = submitted(store)
    got = claim(store, lease_ttl_s=SHORT_LEASE_S)
    assert store.heartbeat(job.id, got.token + 1, 30) is False
    assert store.redis.pttl(f"{store.prefix}:lease:{job.id}") <= 600
    assert store.heartbeat(job.id, got.token, 30) is True
    assert store.redis.pttl(f"{store.prefix}:lease:{job.id}") > 10_000
    assert lease(store, job.id) == str(got.token)


def test_heartbeat_of_a_finished_job_is_false(store: JobStore) -> None:
    job = submitted(store)
    got = claim(store)
    store.finish(got, JobState.SUCCEEDED)
    assert store.heartbeat(job.id, got.token, 30) is False
    assert lease(store, job.id) is None


def test_update_with_the_right_token_changes_the_record(store: JobStore) -> None:
    job = submitted(store)
    got = claim(store)
    new = store.update(job.id, got.token, lambda j: j.with_stage("train", StageState.RUNNING))
    assert new.stages[0].state is StageState.RUNNING
    assert store.get(job.id).stages[0].state is StageState.RUNNING


def test_update_and_finish_with_a_stale_token_change_nothing(store: JobStore) -> None:
    job = submitted(store)
    got = claim(store)
    before = raw(store, job.id)
    stale = Claim(job=got.job, token=got.token + 1)

    with pytest.raises(LeaseLost) as info:
        store.update(job.id, stale.token, lambda j: j.with_stage("train", StageState.RUNNING))
    assert info.value.token == stale.token
    with pytest.raises(LeaseLost):
        store.finish(stale, JobState.SUCCEEDED)
    with pytest.raises(LeaseLost):
        store.give_back(stale, "shutdown")

    assert raw(store, job.id) == before
    assert lease(store, job.id) == str(got.token)
    assert pending(store) == 1
    assert queue_length(store) == 0


def test_an_expired_lease_is_taken_over_and_fences_the_first_runner(store: JobStore) -> None:
    job = submitted(store)
    first = claim(store, "c1", SHORT_LEASE_S)
    time.sleep(SHORT_LEASE_S + 0.4)
    assert lease(store, job.id) is None

    second = claim(store, "c2", SHORT_LEASE_S)
    assert second.job.id == job.id
    assert second.token > first.token
    record = store.get(job.id)
    assert record.state is JobState.RUNNING
    assert record.attempts == 2
    assert len(record.warnings) == 1 and "lease expired" in record.warnings[0]
    assert record.started_at == first.job.started_at

    assert store.heartbeat(job.id, first.token, SHORT_LEASE_S) is False
    assert store.record_progress(job.id, first.token, "train", 0, {"loss": 1.0}) is False
    with pytest.raises(LeaseLost):
        store.finish(first, JobState.FAILED, error="stale")
    assert store.get(job.id).state is JobState.RUNNING
    assert lease(store, job.id) == str(second.token)

    done = store.finish(second, JobState.SUCCEEDED)
    assert done.state is JobState.SUCCEEDED
    assert pending(store) == 0


def test_finish_to_a_terminal_state_releases_the_lease(store: JobStore) -> None:
    job = submitted(store)
    got = claim(store)
    assert pending(store) == 1
    result = {"folder": "jobs/x/attempt-1", "artifacts": ["encoder.pt"]}
    done = store.finish(got, JobState.SUCCEEDED, result=result)
    assert done.state is JobState.SUCCEEDED and done.finished_at is not None
    assert lease(store, job.id) is None
    assert pending(store) == 0
    stored = store.get(job.id)
    assert stored.state is JobState.SUCCEEDED and stored.result == result
    assert stored.stages[0].state is StageState.SKIPPED  # never started by a runner
    # a finished job is not handed out again
    assert store.claim("c2", 0.01, block_ms=BLOCK_MS) is None


def terminal_job(store: JobStore, state: JobState) -> JobRecord:
    job = submitted(store)
    if state is JobState.CANCELLED:
        return store.request_cancel(job.id)
    got = claim(store)
    return store.finish(got, state, error="boom" if state is JobState.FAILED else None)


@pytest.mark.parametrize("state", [JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED])
def test_a_terminal_state_never_changes(store: JobStore, state: JobState) -> None:
    job = terminal_job(store, state)
    before = raw(store, job.id)
    with pytest.raises(InvalidTransition) as info:
        store.request_cancel(job.id)
    assert info.value.current == state
    assert store.claim("c9", 0.01, block_ms=BLOCK_MS) is None
    assert raw(store, job.id) == before
    assert store.get(job.id).state is state


def test_request_cancel_on_a_running_job_flags_it_and_leaves_it_running(store: JobStore) -> None:
    job = submitted(store)
    got = claim(store)
    flagged = store.request_cancel(job.id)
    assert flagged.state is JobState.RUNNING and flagged.cancel_requested
    stored = store.get(job.id)
    assert stored.state is JobState.RUNNING and stored.cancel_requested
    assert stored.finished_at is None
    assert lease(store, job.id) == str(got.token)
    cancelled = store.finish(got, JobState.CANCELLED, error="cancelled by request")
    assert cancelled.state is JobState.CANCELLED


def test_request_cancel_of_another_tenants_job_is_not_found(store: JobStore) -> None:
    job = submitted(store, tenant="a")
    with pytest.raises(JobNotFound):
        store.request_cancel(job.id, tenant="b")
    assert store.get(job.id).state is JobState.QUEUED


# -- progress ---------------------------------------------------------------------------------


def test_record_progress_shows_in_get_and_in_metrics_history(store: JobStore) -> None:
    job = submitted(store)
    got = claim(store)
    assert store.record_progress(job.id, got.token, "train", 0, {"loss": 0.5}) is True
    assert store.record_progress(job.id, got.token, "train", 1, {"loss": 0.25, "val": 0.3})

    record = store.get(job.id)
    assert record.epoch == 1 and record.metrics == {"loss": 0.25, "val": 0.3}
    assert record.stages[0].epoch == 1 and record.stages[0].metrics == {"loss": 0.25, "val": 0.3}
    assert store.metrics_history(job.id) == [
        {"stage": "train", "epoch": 0, "token": got.token, "loss": 0.5},
        {"stage": "train", "epoch": 1, "token": got.token, "loss": 0.25, "val": 0.3},
    ]


def test_record_progress_with_a_wrong_token_writes_nothing(store: JobStore) -> None:
    job = submitted(store)
    got = claim(store)
    assert store.record_progress(job.id, got.token + 1, "train", 0, {"loss": 0.5}) is False
    record = store.get(job.id)
    assert record.epoch is None and record.metrics == {}
    assert record.stages[0].epoch is None and record.stages[0].metrics == {}
    assert store.metrics_history(job.id) == []

    store.record_progress(job.id, got.token, "train", 0, {"loss": 0.5})
    assert store.record_progress(job.id, got.token + 1, "train", 1, {"loss": 9.0}) is False
    assert store.get(job.id).epoch == 0
    assert [m["epoch"] for m in store.metrics_history(job.id)] == [0]


def test_metrics_history_keeps_the_latest_run_per_epoch_after_a_resume(store: JobStore) -> None:
    job = submitted(store)
    first = claim(store)
    for epoch in range(3):
        store.record_progress(job.id, first.token, "train", epoch, {"loss": 1.0 - epoch / 10})
    store.give_back(first, "shutdown")
    second = claim(store, "c2")
    assert second.token > first.token
    for epoch in (1, 2, 3):  # resumed from the epoch-0 checkpoint
        store.record_progress(job.id, second.token, "train", epoch, {"loss": 0.5 - epoch / 10})

    history = store.metrics_history(job.id)
    assert [(m["epoch"], m["token"]) for m in history] == [
        (0, first.token),
        (1, second.token),
        (2, second.token),
        (3, second.token),
    ]
    assert history[0]["loss"] == pytest.approx(1.0)
    assert history[2]["loss"] == pytest.approx(0.3)
    assert store.get(job.id).epoch == 3


def test_give_back_requeues_a_running_job(store: JobStore) -> None:
    job = submitted(store)
    got = claim(store)
    back = store.give_back(got, "dispatcher shutting down")
    assert back.state is JobState.QUEUED
    assert back.warnings == ["dispatcher shutting down"]
    assert back.finished_at is None
    assert lease(store, job.id) is None
    assert pending(store) == 0
    assert store.queued_ids() == [job.id]

    again = claim(store, "c2")
    assert again.job.id == job.id
    assert again.token > got.token
    assert again.job.state is JobState.RUNNING and again.job.attempts == 2
    assert again.job.started_at == got.job.started_at


def test_give_back_of_a_cancel_requested_job_cancels_it_on_the_next_claim(
    store: JobStore,
) -> None:
    job = submitted(store)
    got = claim(store)
    store.request_cancel(job.id)
    store.give_back(got, "shutdown")
    assert store.claim("c2", LONG_LEASE_S, block_ms=BLOCK_MS) is None
    assert store.get(job.id).state is JobState.CANCELLED
    assert pending(store) == 0


# -- the scheduler ----------------------------------------------------------------------------

CLUSTER = {"CPU": 2.0, "memory": 1e9}


def claimed_jobs(
    store: JobStore, priorities: list[int], lease_s: float = LONG_LEASE_S
) -> list[Claim]:
    for priority in priorities:
        store.submit(JobRecord.for_spec(parse_job_spec({**digits_spec(), "priority": priority})))
        time.sleep(0.002)
    return [claim(store, lease_ttl_s=lease_s) for _ in priorities]


def test_stages_are_granted_while_they_fit_and_a_big_one_waits_for_room(store: JobStore) -> None:
    a, b, c = claimed_jobs(store, [0, 0, 0])
    assert store.scheduler.reserve(a, "train", {"CPU": 1}, CLUSTER) == "granted"
    assert store.scheduler.reserve(b, "train", {"CPU": 1}, CLUSTER) == "granted"
    assert store.scheduler.reserved() == ({"CPU": 2.0}, 0)
    assert store.scheduler.reserve(c, "train", {"CPU": 2}, CLUSTER) == "no room"
    store.scheduler.release(a, "train")
    assert store.scheduler.reserve(c, "train", {"CPU": 2}, CLUSTER) == "no room"
    store.scheduler.release(b, "train")
    assert store.scheduler.reserve(c, "train", {"CPU": 2}, CLUSTER) == "granted"
    assert store.scheduler.reserved() == ({"CPU": 2.0}, 0)


def test_a_waiting_stage_is_not_overtaken_by_a_younger_small_one(store: JobStore) -> None:
    a, big, small = claimed_jobs(store, [0, 0, 0])
    assert store.scheduler.reserve(a, "train", {"CPU": 1}, CLUSTER) == "granted"
    assert store.scheduler.reserve(big, "train", {"CPU": 2}, CLUSTER) == "no room"
    # one CPU is free, but the older stage asked first: no starvation of big stages
    assert store.scheduler.reserve(small, "train", {"CPU": 1}, CLUSTER) == "behind"
    assert store.scheduler.reserved() == ({"CPU": 1.0}, 2)
    store.scheduler.release(a, "train")
    assert store.scheduler.reserve(small, "train", {"CPU": 1}, CLUSTER) == "behind"
    assert store.scheduler.reserve(big, "train", {"CPU": 2}, CLUSTER) == "granted"


def test_a_higher_priority_ask_goes_first(store: JobStore) -> None:
    by_priority = {c.job.spec.priority: c for c in claimed_jobs(store, [9, 0, 5])}
    first, low, high = by_priority[9], by_priority[0], by_priority[5]
    assert store.scheduler.reserve(first, "train", {"CPU": 2}, CLUSTER) == "granted"
    assert store.scheduler.reserve(low, "train", {"CPU": 1}, CLUSTER) == "no room"
    # high is first in line now
    assert store.scheduler.reserve(high, "train", {"CPU": 1}, CLUSTER) == "no room"
    store.scheduler.release(first, "train")
    assert store.scheduler.reserve(low, "train", {"CPU": 1}, CLUSTER) == "behind"
    assert store.scheduler.reserve(high, "train", {"CPU": 1}, CLUSTER) == "granted"


def test_resources_of_a_runner_whose_lease_expired_come_back(store: JobStore) -> None:
    (dead,) = claimed_jobs(store, [0], lease_s=SHORT_LEASE_S)
    assert store.scheduler.reserve(dead, "train", {"CPU": 2}, CLUSTER) == "granted"
    assert store.scheduler.reserved() == ({"CPU": 2.0}, 0)
    time.sleep(SHORT_LEASE_S + 0.3)
    assert store.scheduler.reserved() == ({}, 0)
    # the job's next runner holds a new token; the old grant does not count for it either
    again = claim(store, lease_ttl_s=LONG_LEASE_S)
    assert again.job.id == dead.job.id
    assert store.scheduler.reserve(again, "train", {"CPU": 2}, CLUSTER) == "granted"


# -- limits: poison jobs and per-tenant quotas ------------------------------------------------


def test_a_job_whose_runner_keeps_dying_fails_after_max_takeovers(store: JobStore) -> None:
    job = submitted(store)
    tokens = [store.claim("c0", SHORT_LEASE_S, BLOCK_MS, max_takeovers=2)]
    for i in range(1, 3):  # each runner dies: no heartbeat, the lease runs out
        time.sleep(SHORT_LEASE_S + 0.2)
        tokens.append(store.claim(f"c{i}", SHORT_LEASE_S, BLOCK_MS, max_takeovers=2))
    assert all(t is not None for t in tokens)
    assert store.get(job.id).takeovers == 2
    time.sleep(SHORT_LEASE_S + 0.2)
    assert store.claim("c3", SHORT_LEASE_S, BLOCK_MS, max_takeovers=2) is None
    failed = store.get(job.id)
    assert failed.state is JobState.FAILED and "gave up after 3 runs" in (failed.error or "")
    assert pending(store) == 0 and queue_length(store) == 0
    # the next job is not held up by it
    other = submitted(store)
    assert claim(store).job.id == other.id


def test_a_tenant_at_its_limit_of_open_jobs_is_refused_until_one_ends(store: JobStore) -> None:
    first = store.submit(new_job("acme"), max_open=2)[0]
    time.sleep(0.002)  # ids carry the submission time in milliseconds: first stays first
    store.submit(new_job("acme"), "key-2", max_open=2)
    with pytest.raises(TooManyJobs):
        store.submit(new_job("acme"), max_open=2)
    # a retry with a known idempotency key is not a new job, and other tenants are not limited
    assert store.submit(new_job("acme"), "key-2", max_open=2)[1] is False
    assert store.submit(new_job("zeta"), max_open=2)[1] is True
    got = claim(store)
    assert got.job.id == first.id
    with pytest.raises(TooManyJobs):  # running counts too
        store.submit(new_job("acme"), max_open=2)
    store.finish(got, JobState.SUCCEEDED)
    assert store.submit(new_job("acme"), max_open=2)[1] is True


def test_simultaneous_submissions_of_one_tenant_all_land_and_the_limits_hold_exactly(
    store: JobStore, redis_url: str
) -> None:
    """16 clients of one tenant submit at once, 10 jobs each. Within the limits every one is
    stored (none lost to a conflict between them); past them, exactly the limit is stored."""
    clients = [JobStore(connect(redis_url), store.prefix) for _ in range(16)]

    def submit_all(tenant: str, **limits: int) -> Counter[str]:
        barrier, outcomes = threading.Barrier(len(clients)), Counter[str]()
        lock = threading.Lock()

        def run(client: JobStore) -> None:
            barrier.wait()
            for _ in range(10):
                try:
                    outcome = "created" if client.submit(new_job(tenant), **limits)[1] else "seen"
                except (TooManyJobs, RateLimited) as exc:
                    outcome = type(exc).__name__
                with lock:
                    outcomes[outcome] += 1

        threads = [threading.Thread(target=run, args=(c,)) for c in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        return outcomes

    try:
        assert submit_all("acme") == {"created": 160}
        assert len(store.queued_ids("acme")) == 160
        assert submit_all("zeta", max_open=37) == {"created": 37, "TooManyJobs": 123}
        assert int(store.redis.scard(store.keys.open_jobs("zeta"))) == 37
        minute = int(time.time() // 60)
        limited = submit_all("kappa", max_per_minute=25)
        if int(time.time() // 60) == minute:
            assert limited == {"created": 25, "RateLimited": 135}
        else:  # each clock minute has a count of its own
            assert 25 <= limited["created"] <= 50 and limited.total() == 160
    finally:
        for client in clients:
            client.redis.close()


def test_a_redis_user_limited_to_the_prefix_by_an_acl_can_submit(
    store: JobStore, redis_url: str
) -> None:
    """As a managed Redis or a careful operator sets it up: the user may touch aetrain's keys
    only. The submission script names only such keys (no empty one without an idempotency
    key: Redis refused that with NOPERM)."""
    user = f"limited-{secrets.token_hex(4)}"
    store.redis.acl_setuser(user, enabled=True, passwords=["+pw"], keys=[f"{store.prefix}:*"],
                            commands=["+@all"], channels=["*"])  # fmt: skip
    host_port = redis_url.removeprefix("redis://").split("/")[0]
    limited = JobStore(connect(f"redis://{user}:pw@{host_port}/0"), store.prefix)
    try:
        job, created = limited.submit(new_job())
        assert created and limited.get(job.id).id == job.id
        first, _ = limited.submit(new_job(), "key-1")
        again, created = limited.submit(new_job(), "key-1")
        assert not created and again.id == first.id
    finally:
        limited.redis.close()
        store.redis.acl_deluser(user)


def test_without_room_only_a_job_whose_runner_died_is_taken(store: JobStore) -> None:
    (dead,) = claimed_jobs(store, [0], lease_s=SHORT_LEASE_S)
    queued = submitted(store)
    assert store.claim("c2", LONG_LEASE_S, BLOCK_MS, takeovers_only=True) is None
    time.sleep(SHORT_LEASE_S + 0.2)
    again = store.claim("c2", LONG_LEASE_S, BLOCK_MS, takeovers_only=True)
    assert again is not None and again.job.id == dead.job.id
    assert store.claim("c2", LONG_LEASE_S, BLOCK_MS, takeovers_only=True) is None
    assert store.queued_ids() == [queued.id]
    assert store.scheduler.asking_jobs() == set()
    store.scheduler.reserve(again, "train", {"CPU": 1}, CLUSTER)
    assert store.scheduler.asking_jobs() == {dead.job.id}


def test_a_runner_that_is_stopping_claims_nothing(store: JobStore) -> None:
    job = submitted(store)
    assert store.claim("c1", LONG_LEASE_S, block_ms=300, stop=lambda: True) is None
    assert store.queued_ids() == [job.id] and store.get(job.id).attempts == 0


def test_an_unreadable_record_does_not_hide_the_other_jobs_of_the_list(store: JobStore) -> None:
    good, bad = submitted(store, "acme"), submitted(store, "acme")
    store.redis.set(f"{store.prefix}:job:{bad.id}", '{"id": "broken", "spec": 42}')
    items, _ = store.list_jobs("acme")
    assert [job.id for job in items] == [good.id]


def test_a_finished_jobs_keys_expire_after_the_retention_time(redis_url: str) -> None:
    retained = JobStore(connect(redis_url), "retention-test", retention_s=3600)
    job, _ = retained.submit(new_job())
    running = retained.claim("c1", LONG_LEASE_S, block_ms=BLOCK_MS)
    assert running is not None
    retained.record_progress(job.id, running.token, "train", 0, {"train_loss": 1.0})
    assert retained.redis.ttl(retained.keys.job(job.id)) == -1  # running: kept
    retained.finish(running, JobState.SUCCEEDED, result={})
    for key in (retained.keys.job(job.id), retained.keys.progress(job.id),
                retained.keys.metrics(job.id), retained.keys.fence(job.id)):  # fmt: skip
        assert 3500 < retained.redis.ttl(key) <= 3600, key
    retained.redis.delete(retained.keys.job(job.id))  # as if the TTL had passed
    assert retained.list_jobs("default") == ([], None)
    assert retained.redis.zcard(retained.keys.index("default")) == 0
    for key in retained.redis.scan_iter("retention-test:*"):
        retained.redis.delete(key)


def test_a_metrics_stream_is_capped_at_what_its_job_needs(store: JobStore) -> None:
    from shared.store import metrics_cap

    job = submitted(store)
    running = claim(store)
    cap = metrics_cap(job)
    assert cap == 2 * 3 + 100  # digits_spec: one stage of 3 epochs
    for epoch in range(5 * cap):
        assert store.record_progress(job.id, running.token, "train", epoch % 3, {"x": 1.0}, cap)
    # Redis trims by whole nodes with `~`: never below the cap, and not far above it.
    assert cap <= store.redis.xlen(store.keys.metrics(job.id)) < cap + 200


def test_a_state_filtered_page_reads_only_jobs_in_that_state(store: JobStore) -> None:
    finished = []
    for _ in range(300):
        submitted(store, "acme")
        finished.append(store.finish(claim(store), JobState.SUCCEEDED, result={}))
    running_job = submitted(store, "acme")
    running = claim(store)
    assert running.job.id == running_job.id
    gets_before = store.redis.info("commandstats").get("cmdstat_get", {}).get("calls", 0)
    items, cursor = store.list_jobs("acme", JobState.RUNNING, limit=10)
    gets = store.redis.info("commandstats")["cmdstat_get"]["calls"] - gets_before
    assert [j.id for j in items] == [running_job.id] and cursor is None
    assert gets <= 2  # the one running record, not the 300 finished ones
    page, _ = store.list_jobs("acme", JobState.SUCCEEDED, limit=5)
    assert [j.id for j in page] == [j.id for j in reversed(finished[-5:])]
    store.finish(running, JobState.CANCELLED)
    assert store.list_jobs("acme", JobState.RUNNING) == ([], None)
    assert store.list_jobs("acme", JobState.CANCELLED)[0][0].id == running_job.id


def test_jobs_stored_before_the_state_indexes_are_indexed_once(store: JobStore) -> None:
    job = submitted(store, "acme")
    store.finish(claim(store), JobState.SUCCEEDED, result={})
    for state in JobState:  # as a database from before the per-state indexes
        store.redis.delete(store.keys.state_index("acme", state))
    assert store.list_jobs("acme", JobState.SUCCEEDED) == ([], None)
    assert store.index_states() == 1
    assert store.list_jobs("acme", JobState.SUCCEEDED)[0][0].id == job.id
    assert store.index_states() == 0  # once per database


# -- holds of idle warm groups ----------------------------------------------------------------


def test_a_stage_ending_on_a_warm_group_hands_its_grant_to_the_group_in_one_step(
    store: JobStore,
) -> None:
    a, b = claimed_jobs(store, [0, 0])
    scheduler = store.scheduler
    assert scheduler.reserve(a, "train", {"CPU": 2}, CLUSTER) == "granted"
    scheduler.park(a, "train", "g1", {"CPU": 2}, ttl_s=30)
    assert scheduler.holds() == {"g1": {"CPU": 2}}
    assert scheduler.reserved() == ({"CPU": 2.0}, 0)  # the group still holds the CPUs
    assert a.job.id not in scheduler.asking_jobs()
    # Another stage gets them only with the group, which the ask adopts...
    assert scheduler.reserve(b, "train", {"CPU": 2}, CLUSTER) == "no room"
    assert scheduler.reserve(b, "train", {"CPU": 2}, CLUSTER, adopt="g1") == "granted"
    # ...and the hold became its grant: counted once.
    assert scheduler.holds() == {}
    assert scheduler.reserved() == ({"CPU": 2.0}, 0)


def test_an_adopting_ask_keeps_its_place_in_line(store: JobStore) -> None:
    a, first, second = claimed_jobs(store, [0, 0, 0])
    scheduler = store.scheduler
    assert scheduler.reserve(a, "train", {"CPU": 1}, CLUSTER) == "granted"
    scheduler.park(a, "train", "g1", {"CPU": 1}, ttl_s=30)
    assert scheduler.reserve(first, "train", {"CPU": 2}, CLUSTER) == "no room"
    # The idle group would fit the younger ask, but the older one asked first.
    assert scheduler.reserve(second, "train", {"CPU": 1}, CLUSTER, adopt="g1") == "behind"
    assert scheduler.holds() == {"g1": {"CPU": 1}}  # not taken by an ask that was not granted
    scheduler.drop_hold("g1")  # retired for the waiting stage
    assert scheduler.reserve(first, "train", {"CPU": 2}, CLUSTER) == "granted"


def test_a_hold_that_is_not_renewed_lapses_and_its_resources_are_free(store: JobStore) -> None:
    (a,) = claimed_jobs(store, [0])
    scheduler = store.scheduler
    assert scheduler.hold("g1", {"CPU": 1}, CLUSTER, ttl_s=0.2)
    assert scheduler.hold("g2", {"CPU": 1}, CLUSTER, ttl_s=30)
    assert not scheduler.hold("g3", {"CPU": 1}, CLUSTER, ttl_s=30)  # the cluster is full
    assert scheduler.renew_holds(["g2"], ttl_s=30) == set()
    time.sleep(0.3)
    assert scheduler.reserved() == ({"CPU": 1.0}, 0)  # g1 lapsed; g2 had a long ttl
    assert scheduler.renew_holds(["g1", "g2"], ttl_s=30) == {"g1"}  # its pool must retire it
    assert scheduler.reserve(a, "train", {"CPU": 1}, CLUSTER) == "granted"


def test_no_group_is_started_warm_while_a_stage_waits(store: JobStore) -> None:
    a, big = claimed_jobs(store, [0, 0])
    scheduler = store.scheduler
    assert scheduler.reserve(a, "train", {"CPU": 1}, CLUSTER) == "granted"
    assert scheduler.reserve(big, "train", {"CPU": 2}, CLUSTER) == "no room"
    assert not scheduler.hold("g1", {"CPU": 1}, CLUSTER, ttl_s=30)  # the big stage waits
    scheduler.release(a, "train")
    assert scheduler.reserve(big, "train", {"CPU": 2}, CLUSTER) == "granted"

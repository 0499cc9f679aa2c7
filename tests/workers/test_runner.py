"""The runner's watch over a stage, on a real Redis: cancel requests and the progress deadline."""

import time

import pytest

from shared.claims import Claim
from shared.jobs import JobRecord
from shared.specs import parse_job_spec
from shared.store import JobStore
from tests.specs import digits_spec
from workers.runner import ProgressWatch, Stalled, Stopped, StopReason

pytestmark = pytest.mark.timeout(30)


def running_job(store: JobStore) -> Claim:
    store.submit(JobRecord.for_spec(parse_job_spec(digits_spec())))
    claim = store.claim("r1", 30.0, block_ms=100)
    assert claim is not None
    return claim


def test_a_stage_without_a_new_epoch_past_its_deadline_is_stalled(store: JobStore) -> None:
    claim = running_job(store)
    watch = ProgressWatch(store, claim.job.id, "train", deadline_s=0.4, startup_s=0.4)
    watch.check()
    time.sleep(0.5)
    watch.check()  # before the first epoch the deadline is 0.4 + 0.4 s
    time.sleep(0.4)
    with pytest.raises(Stalled, match="no epoch finished"):
        watch.check()


def test_each_new_epoch_restarts_the_deadline(store: JobStore) -> None:
    claim = running_job(store)
    store.record_progress(claim.job.id, claim.token, "train", 4, {"loss": 1.0})
    watch = ProgressWatch(store, claim.job.id, "train", deadline_s=0.5, startup_s=0.0)
    watch.check()  # epoch 4 came from an earlier run: not progress of this one
    for epoch in range(5, 10):
        time.sleep(0.3)
        store.record_progress(claim.job.id, claim.token, "train", epoch, {"loss": 1.0})
        watch.check()
    assert watch.epoch == 9 and watch.seen_progress
    time.sleep(0.6)
    with pytest.raises(Stalled):
        watch.check()


def test_a_cancel_request_stops_the_stage(store: JobStore) -> None:
    claim = running_job(store)
    watch = ProgressWatch(store, claim.job.id, "train", deadline_s=60)
    store.request_cancel(claim.job.id)
    with pytest.raises(Stopped) as info:
        watch.check()
    assert info.value.reason is StopReason.CANCELLED

"""A dispatcher's metrics, fed the events of real claims on a real Redis (no Ray): takeovers,
epochs and samples read from the jobs' metrics streams, the first epoch counted once per job,
stage durations once per stage, and warm groups busy and idle."""

import time
from dataclasses import dataclass, field

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.claims import Claim
from shared.jobs import JobRecord, JobState, StageState
from shared.specs import parse_job_spec
from shared.store import JobStore
from tests.conftest import free_port
from tests.specs import digits_spec
from workers.metrics import DispatcherMetrics, is_takeover

pytestmark = pytest.mark.timeout(60)

EPOCH = {"train_loss": 1.0, "epoch_seconds": 2.0, "samples_per_s": 719.0}  # 1438 samples


def value(metrics: DispatcherMetrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def submit(store: JobStore) -> JobRecord:
    return store.submit(JobRecord.for_spec(parse_job_spec(digits_spec())))[0]


def claim(store: JobStore, lease_ttl_s: float = 30.0) -> Claim:
    claimed = store.claim("runner", lease_ttl_s=lease_ttl_s, block_ms=200)
    assert claimed is not None
    return claimed


def take_over(store: JobStore, job_id: str) -> Claim:
    """Wait out the lease of the job's runner, then claim the job as another runner."""
    deadline = time.monotonic() + 10
    while store.redis.exists(store.keys.lease(job_id)) and time.monotonic() < deadline:
        time.sleep(0.05)
    claimed = store.claim("other-runner", lease_ttl_s=30.0, block_ms=200)
    assert claimed is not None and claimed.job.id == job_id
    return claimed


def test_a_takeover_is_told_from_a_claim_from_the_queue(store: JobStore) -> None:
    job = submit(store)
    first = claim(store, lease_ttl_s=0.6)
    second = take_over(store, job.id)
    metrics = DispatcherMetrics()
    metrics.job_claimed(first)
    metrics.job_claimed(second)
    assert not is_takeover(first.job) and is_takeover(second.job)
    assert value(metrics, "aetrain_dispatcher_jobs_claimed_total") == 2
    assert value(metrics, "aetrain_dispatcher_takeovers_total") == 1
    # given back to the queue and claimed again: no takeover, though the record has one
    store.give_back(second, "dispatcher stopped")
    third = claim(store)
    assert third.job.takeovers == 1 and not is_takeover(third.job)


def test_epochs_and_samples_are_counted_and_the_first_epoch_once(store: JobStore) -> None:
    job = submit(store)
    run = claim(store)
    metrics = DispatcherMetrics(store)
    metrics.job_claimed(run)
    metrics.sample()
    assert value(metrics, "aetrain_training_epochs_total") == 0
    for epoch in range(2):
        assert store.record_progress(job.id, run.token, "train", epoch, EPOCH)
    metrics.sample()
    metrics.sample()  # nothing new: nothing counted twice
    assert value(metrics, "aetrain_training_epochs_total") == 2
    assert value(metrics, "aetrain_training_samples_total") == pytest.approx(2 * 1438)
    assert value(metrics, "aetrain_job_first_epoch_seconds_count") == 1
    waited = value(metrics, "aetrain_job_first_epoch_seconds_sum")
    assert 0 <= waited < 30
    assert store.record_progress(job.id, run.token, "train", 2, {**EPOCH, "samples_per_s": None})
    metrics.job_ended(run, None)  # the last epochs are read at the end, without a sample
    assert value(metrics, "aetrain_training_epochs_total") == 3
    assert value(metrics, "aetrain_training_samples_total") == pytest.approx(2 * 1438)
    assert value(metrics, "aetrain_job_first_epoch_seconds_count") == 1
    assert value(metrics, "aetrain_dispatcher_jobs_ended_total", state="lost") == 1


def test_a_run_that_takes_over_counts_only_its_own_epochs(store: JobStore) -> None:
    job = submit(store)
    first = claim(store, lease_ttl_s=0.6)
    assert store.record_progress(job.id, first.token, "train", 0, EPOCH)
    second = take_over(store, job.id)
    metrics = DispatcherMetrics(store)  # the other dispatcher's
    metrics.job_claimed(second)
    assert store.record_progress(job.id, second.token, "train", 1, EPOCH)
    metrics.sample()
    assert value(metrics, "aetrain_training_epochs_total") == 1
    assert value(metrics, "aetrain_job_first_epoch_seconds_count") == 0  # not the job's first


def test_without_a_store_nothing_is_read(store: JobStore) -> None:
    job = submit(store)
    run = claim(store)
    metrics = DispatcherMetrics()
    metrics.job_claimed(run)
    assert store.record_progress(job.id, run.token, "train", 0, EPOCH)
    metrics.sample()
    assert value(metrics, "aetrain_training_epochs_total") == 0


def test_stage_durations_are_observed_once_by_stage_kind_and_state(store: JobStore) -> None:
    submit(store)
    run = claim(store)
    metrics = DispatcherMetrics(store)
    metrics.job_claimed(run)
    store.update(run.job.id, run.token, lambda job: job.with_stage("train", StageState.RUNNING))
    metrics.stages_trained(run.job, {"train": {"start": 0.4, "fit": 3.0}})
    record = store.finish(run, JobState.SUCCEEDED, result={})
    metrics.job_ended(run, record)
    labels = {"kind": "autoencoder", "state": "succeeded"}
    assert value(metrics, "aetrain_stage_duration_seconds_count", **labels) == 1
    assert value(metrics, "aetrain_stage_startup_seconds_count", kind="autoencoder") == 1
    assert value(metrics, "aetrain_stage_startup_seconds_sum", kind="autoencoder") == 0.4
    assert value(metrics, "aetrain_dispatcher_jobs_ended_total", state="succeeded") == 1


def test_a_stage_that_ended_in_an_earlier_run_is_not_observed_again(store: JobStore) -> None:
    stacked = {"kind": "stacked", "data": {"dataset": "digits"},
               "layers": [{"units": 32}, {"units": 16}]}  # fmt: skip
    job = store.submit(JobRecord.for_spec(parse_job_spec(stacked)))[0]
    first = claim(store, lease_ttl_s=0.6)
    for to in (StageState.RUNNING, StageState.SUCCEEDED):
        first = Claim(job=store.update(job.id, first.token,
                                       lambda j, to=to: j.with_stage("layer1", to)),
                      token=first.token)  # fmt: skip
    second = take_over(store, job.id)
    metrics = DispatcherMetrics()
    metrics.job_claimed(second)
    store.update(job.id, second.token, lambda j: j.with_stage("layer2", StageState.RUNNING))
    metrics.job_ended(second, store.finish(second, JobState.FAILED, error="boom"))
    assert value(metrics, "aetrain_stage_duration_seconds_count", kind="layer",
                 state="succeeded") == 0  # fmt: skip
    assert value(metrics, "aetrain_stage_duration_seconds_count", kind="layer",
                 state="failed") == 1  # fmt: skip


@dataclass
class FakePool:
    groups: dict[str, object] = field(default_factory=dict)
    idle: int = 0

    def idle_count(self) -> int:
        return self.idle


def test_warm_groups_running_jobs_and_slots_are_read_when_scraped() -> None:
    metrics = DispatcherMetrics()
    pool = FakePool({"g1": object(), "g2": object(), "g3": object()}, idle=1)
    running: list[str] = ["j1"]
    metrics.bind(lambda: len(running), 4, pool)
    read = metrics.registry.get_sample_value
    assert read("aetrain_warm_groups", {"state": "busy"}) == 2
    assert read("aetrain_warm_groups", {"state": "idle"}) == 1
    assert read("aetrain_dispatcher_jobs_running") == 1
    assert read("aetrain_dispatcher_slots") == 4
    pool.idle, running[:] = 3, []
    assert read("aetrain_warm_groups", {"state": "busy"}) == 0
    assert read("aetrain_dispatcher_jobs_running") == 0


def test_the_metrics_are_served_on_their_port_in_the_prometheus_format() -> None:
    metrics = DispatcherMetrics()
    port = free_port()
    metrics.serve(port, "127.0.0.1")
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    finally:
        metrics.close()
    assert response.status_code == 200
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert {"aetrain_dispatcher_takeovers", "aetrain_stage_duration_seconds",
            "aetrain_job_first_epoch_seconds", "aetrain_training_samples",
            "aetrain_dispatcher_jobs_running"} <= names  # fmt: skip
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)

"""Storage quotas: the estimate from a spec, the ledger on a real Redis (one winner for the last
room), and the 507s of POST /v1/jobs: over quota, a hostile spec, a disk below its floor."""

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from shared.errors import QuotaExceeded
from shared.quotas import (
    FIXED_JOB_BYTES,
    Quotas,
    dataset_bytes,
    estimate_job_bytes,
    job_item,
    stage_parameters,
)
from shared.settings import Settings
from shared.specs import DenseModelSpec, parse_job_spec
from shared.stages import plan_stages
from shared.store import JobStore
from tests.conftest import data_keys
from tests.specs import digits_spec

pytestmark = pytest.mark.timeout(60)

# Within the 50M-parameter limit, 100 checkpoints kept: the ~60 GB stage of issue 9.
HOSTILE = {
    "kind": "autoencoder",
    "data": {"dataset": "mnist5k"},
    "model": {"arch": "dense", "hidden": [8192, 2048], "latent_dim": 256},
    "training": {"checkpoints_to_keep": 100},
}


# -- the estimate (pure) ------------------------------------------------------------------------
def test_the_estimate_counts_weights_and_adam_moments_per_kept_checkpoint_plus_artifacts() -> None:
    spec = parse_job_spec(digits_spec(checkpoints_to_keep=4))
    params = DenseModelSpec(hidden=(128,), latent_dim=16).parameter_count(64)
    codes = 2 * 360 * 16 * 4  # validation rows of digits (1797 x 0.2) x code size, float32
    expected = params * 4 * 3 * (4 + 1) + params * 4 * 4 + codes + FIXED_JOB_BYTES
    assert estimate_job_bytes(spec) == expected


def test_the_hostile_spec_is_valid_but_its_estimate_is_tens_of_gigabytes() -> None:
    spec = parse_job_spec(HOSTILE)
    [stage] = plan_stages(spec)
    assert 47_000_000 < stage_parameters(spec, stage) <= 50_000_000
    assert estimate_job_bytes(spec) > 55 * 10**9  # 12 bytes x 47.5M parameters x 101


def test_every_stage_of_a_semisupervised_stack_is_counted() -> None:
    spec = parse_job_spec({
        "kind": "semisupervised", "data": {"dataset": "digits"}, "labeled_fraction": 0.1,
        "pretrain": {"kind": "stacked", "layers": [{"units": 32}, {"units": 8}],
                     "finetune": {}},
    })  # fmt: skip
    counts = {stage.name: stage_parameters(spec, stage) for stage in plan_stages(spec)}
    layer1, layer2 = 2 * 64 * 32 + 64 + 32, 2 * 32 * 8 + 32 + 8  # 64 -> 32 -> 8, tied=False
    assert counts == {
        "pretrain-layer1": layer1,
        "pretrain-layer2": layer2,
        "pretrain-finetune": layer1 + layer2,
        "head": layer1 + layer2 + 8 * 64 + 64 + 64 * 10 + 10,  # the encoder it holds + 8-64-10
        "baseline": 64 * 64 + 64 + 64 * 10 + 10,  # 64 raw inputs -> 64 -> 10 classes
    }


def test_a_datasets_charge_is_its_arrays_as_stored() -> None:
    assert dataset_bytes((1000, 28, 28), labeled=True) == 1000 * 784 * 4 + 1000 * 8
    assert dataset_bytes((10, 3), labeled=False) == 120


# -- the ledger ---------------------------------------------------------------------------------
def test_a_charge_is_refused_past_the_limit_and_a_retry_is_not_charged_twice(
    store: JobStore,
) -> None:
    quotas = Quotas(store.redis, store.keys, limit_bytes=1000)
    assert quotas.charge("alice", "job:a", 600) is True
    assert quotas.charge("alice", "job:a", 600) is False  # the same item again
    with pytest.raises(QuotaExceeded) as refused:
        quotas.charge("alice", "job:b", 500, "job b")
    assert (refused.value.needed, refused.value.available) == (500, 400)
    assert "job b" in str(refused.value) and "500" in str(refused.value)
    assert quotas.charge("bob", "job:c", 1000)  # every tenant has its own
    assert quotas.ledger("alice") == {"job:a": 600}
    assert quotas.release("alice", "job:a") == 1
    assert quotas.used("alice") == 0 and not store.redis.exists(store.keys.quota("alice"))


def test_twenty_racing_charges_for_ten_bytes_of_room_have_ten_winners(store: JobStore) -> None:
    quotas = Quotas(store.redis, store.keys, limit_bytes=10)
    outcomes: list[bool] = []
    start = threading.Barrier(20)

    def charge(i: int) -> None:
        start.wait()
        try:
            outcomes.append(quotas.charge("alice", f"job:{i}", 1))
        except QuotaExceeded:
            outcomes.append(False)

    threads = [threading.Thread(target=charge, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count(True) == 10 and quotas.used("alice") == 10


# -- POST /v1/jobs ------------------------------------------------------------------------------
@pytest.fixture
def small_quota(settings: Settings, store: JobStore) -> Iterator[tuple[TestClient, int]]:
    """A client whose tenant has room for one digits job and a half."""
    estimate = estimate_job_bytes(parse_job_spec(digits_spec()))
    capped = settings.model_copy(update={"storage_quota_bytes": estimate * 3 // 2})
    with TestClient(create_app(capped)) as client:
        yield client, estimate


def ledger(store: JobStore, tenant: str = "default") -> dict[str, Any]:
    return Quotas(store.redis, store.keys).ledger(tenant)


def test_a_job_within_quota_is_charged_one_over_it_is_507_and_a_delete_frees_the_room(
    small_quota: tuple[TestClient, int], store: JobStore
) -> None:
    client, estimate = small_quota
    first = client.post("/v1/jobs", json=digits_spec())
    assert first.status_code == 201
    assert ledger(store) == {job_item(first.json()["id"]): estimate}

    refused = client.post("/v1/jobs", json=digits_spec())

    assert refused.status_code == 507
    detail = refused.json()["detail"]
    assert f"{estimate:,}" in detail and f"{estimate * 3 // 2 - estimate:,} are left" in detail
    assert "AETRAIN_STORAGE_QUOTA_BYTES" in detail
    assert len(store.queued_ids()) == 1 and len(ledger(store)) == 1

    client.post(f"/v1/jobs/{first.json()['id']}/cancel")
    assert client.delete(f"/v1/jobs/{first.json()['id']}").status_code == 204
    assert ledger(store) == {}
    assert client.post("/v1/jobs", json=digits_spec()).status_code == 201


def test_an_idempotent_retry_is_not_charged_again_even_with_the_quota_full(
    small_quota: tuple[TestClient, int], store: JobStore
) -> None:
    client, estimate = small_quota
    headers = {"Idempotency-Key": "once"}
    first = client.post("/v1/jobs", json=digits_spec(), headers=headers)
    retry = client.post("/v1/jobs", json=digits_spec(), headers=headers)
    assert (first.status_code, retry.status_code) == (201, 200)  # room for 1.5 jobs: no charge
    assert retry.json()["id"] == first.json()["id"]
    assert ledger(store) == {job_item(first.json()["id"]): estimate}
    other = client.post("/v1/jobs", json=digits_spec(), headers={"Idempotency-Key": "new"})
    assert other.status_code == 507 and len(store.queued_ids()) == 1


def test_the_hostile_spec_is_refused_before_anything_is_stored(
    client: TestClient, store: JobStore
) -> None:
    estimate = estimate_job_bytes(parse_job_spec(HOSTILE))

    refused = client.post("/v1/jobs", json=HOSTILE)

    assert refused.status_code == 507, refused.text
    detail = refused.json()["detail"]
    assert f"needs about {estimate:,} bytes" in detail
    assert f"only {20 * 2**30:,} are left" in detail and "100 + 1 checkpoints" in detail
    assert data_keys(store) == []  # no record, no queue entry, no charge


def test_a_submission_while_the_disk_is_below_its_floor_is_507_naming_the_setting(
    settings: Settings, store: JobStore
) -> None:
    floor = settings.model_copy(update={"min_free_disk_bytes": 2**62})
    with TestClient(create_app(floor)) as client:
        refused = client.post("/v1/jobs", json=digits_spec())
    assert refused.status_code == 507
    assert "AETRAIN_MIN_FREE_DISK_BYTES" in refused.json()["detail"]
    assert f"{2**62:,}" in refused.json()["detail"]
    assert data_keys(store) == []


def test_a_charge_reads_a_running_total_not_the_whole_ledger(store: JobStore) -> None:
    quotas = Quotas(store.redis, store.keys, limit_bytes=10**12)
    with store.redis.pipeline(transaction=False) as pipe:  # 10,000 charges of finished jobs
        for i in range(10_000):
            pipe.hset(store.keys.quota("alice"), f"job:old{i}", 100)
        pipe.execute()
    assert quotas.charge("alice", "job:new", 5)  # a ledger from before the total: summed once
    assert quotas.used("alice") == 1_000_005
    assert int(store.redis.get(store.keys.quota_total("alice"))) == 1_000_005
    store.redis.hset(store.keys.quota("alice"), "job:old0", 10**9)  # not read again
    assert quotas.charge("alice", "job:next", 1) and quotas.used("alice") == 1_000_006
    store.redis.hset(store.keys.quota("alice"), "job:old0", 100)
    assert quotas.release("alice", "job:new", "job:next", "job:unknown") == 2
    assert quotas.used("alice") == 1_000_000
    assert quotas.release("alice", *(f"job:old{i}" for i in range(10_000))) == 10_000
    assert not store.redis.exists(store.keys.quota("alice"), store.keys.quota_total("alice"))

"""Uploads count against the tenant's storage quota and the disk's free-space floor: a refused
upload leaves no file and no index entry behind; deleting an upload gives its bytes back."""

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from shared.quotas import Quotas, dataset_item
from shared.settings import Settings
from shared.storage import LocalStorage
from shared.store import JobStore
from tests.service.test_datasets import files_under, npz_bytes
from tests.specs import digits_spec

pytestmark = pytest.mark.timeout(60)
ROWS, FEATURES = 100, 64
STORED = ROWS * FEATURES * 4 + ROWS * 8  # float32 x, int64 y


def dataset(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return npz_bytes(x=rng.random((ROWS, FEATURES)), y=rng.integers(0, 3, ROWS))


def test_an_upload_past_the_quota_is_507_and_leaves_nothing(
    settings: Settings, store: JobStore, storage: LocalStorage
) -> None:
    quota = settings.model_copy(update={"storage_quota_bytes": int(STORED * 1.5)})
    ledger = Quotas(store.redis, store.keys)
    with TestClient(create_app(quota)) as api:
        first = api.post("/v1/datasets", content=dataset(0))
        assert first.status_code == 201
        assert ledger.ledger("default") == {dataset_item(first.json()["id"]): STORED}
        again = api.post("/v1/datasets", content=dataset(0))
        assert again.status_code == 200 and ledger.used("default") == STORED  # not twice
        refused = api.post("/v1/datasets", content=dataset(1))
        assert refused.status_code == 507, refused.text
        assert "AETRAIN_STORAGE_QUOTA_BYTES" in refused.json()["detail"]
        assert [d["id"] for d in api.get("/v1/datasets").json()["items"]] == [first.json()["id"]]
        stored = {p.name for p in files_under(storage.datasets_root)}
        assert stored == {f"{first.json()['id']}.npz", f"{first.json()['id']}.json"}
        assert api.delete(f"/v1/datasets/{first.json()['id']}").status_code == 204
        assert ledger.used("default") == 0
        assert api.post("/v1/datasets", content=dataset(1)).status_code == 201  # room again


def test_below_the_free_disk_floor_uploads_and_jobs_are_507(
    settings: Settings, store: JobStore, storage: LocalStorage
) -> None:
    full = settings.model_copy(update={"min_free_disk_bytes": 2**62})  # more than any disk
    with TestClient(create_app(full)) as api:
        upload = api.post("/v1/datasets", content=dataset(0))
        job = api.post("/v1/jobs", json=digits_spec())
    for refused in (upload, job):
        assert refused.status_code == 507, refused.text
        assert "AETRAIN_MIN_FREE_DISK_BYTES" in refused.json()["detail"]
    assert store.queued_ids() == [] and files_under(storage.datasets_root) == []

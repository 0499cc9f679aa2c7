"""The index of uploaded datasets per tenant (the files themselves live in storage).

Uploads are content-addressed, so tenants that upload the same bytes share one file; the set
`dataset_owners:<id>` names the tenants whose index holds it, and the file may go only when
the last of them deletes it.
"""

import json
from collections.abc import Iterator
from typing import Any

from shared.datasets import DatasetInfo
from shared.errors import DatasetInUse, DatasetNotFound
from shared.redis_keys import Keys
from shared.transactions import transact

_OPEN_STATES = frozenset({"queued", "running"})


class DatasetIndex:
    def __init__(self, client: Any, keys: Keys) -> None:
        self.redis: Any = client
        self.keys = keys

    def add(self, tenant: str, info: DatasetInfo) -> tuple[DatasetInfo, bool]:
        """Index an upload for a tenant; the same bytes again return the first entry."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hsetnx(self.keys.datasets(tenant), info.id, info.model_dump_json())
        pipe.sadd(self.keys.dataset_owners(info.id), tenant)
        created, _ = pipe.execute()
        if created:
            return info, True
        return self.get(tenant, info.id), False

    def owners(self, dataset_id: str) -> set[str]:
        """Tenants whose index names these bytes."""
        return set(self.redis.smembers(self.keys.dataset_owners(dataset_id)))

    def get(self, tenant: str, dataset_id: str) -> DatasetInfo:
        raw = self.redis.hget(self.keys.datasets(tenant), dataset_id)
        if raw is None:
            raise DatasetNotFound(dataset_id)
        return DatasetInfo.model_validate_json(raw)

    def list(self, tenant: str) -> list[DatasetInfo]:
        """A tenant's uploads, newest first."""
        raw = self.redis.hvals(self.keys.datasets(tenant))
        infos = [DatasetInfo.model_validate_json(r) for r in raw]
        return sorted(infos, key=lambda info: (info.created_at, info.id), reverse=True)

    def delete(self, tenant: str, dataset_id: str) -> bool:
        """Drop a tenant's entry; True when no tenant's index names the dataset any more.

        DatasetInUse while a queued or running job of the tenant names it; DatasetNotFound if
        the tenant has no such entry. The check and the removal are one transaction that a
        job entering or leaving the tenant's open set retries. An entry indexed before owners
        were kept has none, and then the file is kept (False) rather than risked.
        """
        index, owners = self.keys.datasets(tenant), self.keys.dataset_owners(dataset_id)
        open_jobs = self.keys.open_jobs(tenant)

        def body(pipe: Any) -> bool:
            if not pipe.hexists(index, dataset_id):
                raise DatasetNotFound(dataset_id)
            job_ids = sorted(pipe.smembers(open_jobs))
            records = pipe.mget([self.keys.job(job_id) for job_id in job_ids]) if job_ids else []
            users = [job_id for job_id, raw in zip(job_ids, records, strict=True)
                     if raw is not None and _uses(json.loads(raw), dataset_id)]  # fmt: skip
            if users:
                raise DatasetInUse(dataset_id, users)
            pipe.multi()
            pipe.hdel(index, dataset_id)
            pipe.srem(owners, tenant)
            pipe.scard(owners)
            _, was_owner, remaining = pipe.execute()
            return bool(was_owner) and remaining == 0

        return transact(self.redis, [index, owners, open_jobs], body,
                        f"delete of dataset {dataset_id}")  # fmt: skip


def _uses(record: dict[str, Any], dataset_id: str) -> bool:
    """Whether an open job's record names the dataset anywhere in its spec."""
    return record.get("state") in _OPEN_STATES and dataset_id in _named_datasets(record["spec"])


def _named_datasets(node: Any) -> Iterator[str]:
    """Every `data.dataset` in a spec document, however deep: today only the job's own `data`
    (a semisupervised job's pretraining uses the job's data), but a nested spec with data of
    its own would be found too."""
    if isinstance(node, dict):
        data = node.get("data")
        if isinstance(data, dict) and isinstance(data.get("dataset"), str):
            yield data["dataset"]
        for value in node.values():
            yield from _named_datasets(value)
    elif isinstance(node, list):
        for value in node:
            yield from _named_datasets(value)

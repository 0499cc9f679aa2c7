"""The index of uploaded datasets per tenant (the files themselves live in storage)."""

from typing import Any

from shared.datasets import DatasetInfo
from shared.errors import DatasetNotFound
from shared.redis_keys import Keys


class DatasetIndex:
    def __init__(self, client: Any, keys: Keys) -> None:
        self.redis: Any = client
        self.keys = keys

    def add(self, tenant: str, info: DatasetInfo) -> tuple[DatasetInfo, bool]:
        """Index an upload for a tenant; the same bytes again return the first entry."""
        if self.redis.hsetnx(self.keys.datasets(tenant), info.id, info.model_dump_json()):
            return info, True
        return self.get(tenant, info.id), False

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

"""JobReads: `GET /v1/jobs/{id}` on the event loop, through an asyncio Redis client.

The most frequent request of the API (clients poll it). Read with the sync JobStore, it made
one hop to the thread pool and back per request, a seventh of the API's CPU under a read load
(docs/benchmarks.md); here it is one pipelined round trip awaited on the loop, and the record
is built by the same function as JobStore.get's (shared.store.record_with_progress).
"""

from service.async_redis import connect_async
from shared.jobs import JobRecord
from shared.redis_keys import Keys
from shared.store import record_with_progress


class JobReads:
    def __init__(self, url: str, keys: Keys) -> None:
        self.redis = connect_async(url)
        self.keys = keys

    async def get(self, job_id: str, tenant: str | None = None) -> JobRecord:
        """The job record with its live progress; another tenant's job is JobNotFound."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self.keys.job(job_id))
            pipe.hgetall(self.keys.progress(job_id))
            raw, progress = await pipe.execute()
        return record_with_progress(job_id, raw, progress, tenant)

    async def close(self) -> None:
        await self.redis.aclose()

"""Every Redis key aetrain uses, built in one place (arq's constants.py, rq's key_template).

    job:<id>             the job record (JSON)
    progress:<id>        hash: per stage {"epoch", "metrics"}, and `_latest`
    metrics:<id>         stream: one entry per finished epoch of any stage (capped)
    lease:<id>           the runner's fencing token, with a TTL
    fence:<id>           counter of fencing tokens
    jobs:<tenant>        sorted set (by id) of a tenant's jobs: the listing index
    jobs:<tenant>:<state> the same, of the jobs in one state (the filtered listing)
    open:<tenant>        set of a tenant's queued and running jobs: what its limit counts
    queue:<tenant>       sorted set of a tenant's queued jobs (score: -priority; ties: age)
    waiting_tenants      set of tenants that may have queued jobs
    running:<tenant>     set of a tenant's running jobs (fair claiming evens these out)
    served               hash: tenant -> when its last job started (turns between equals)
    active               set of running jobs (of every tenant)
    tenants              set of every tenant that submitted
    submissions:<t>:<m>  a tenant's submissions in clock minute m (expires)
    changes              stream of job ids whose record changed (capped)
    scheduler, waiting   resource grants of stages, holds of idle warm groups, and the line
                         of stages waiting for theirs
    group:<id>           hash: a warm worker group's channel (task, outcome, stop, heartbeat)
    datasets:<tenant>    hash: dataset id -> DatasetInfo of a tenant's uploads
    apikey:<digest>, apikeyid:<id>, apikeys   API keys (shared/apikey_store.py)
    dispatchers          hash: dispatcher id -> its info; `dispatcher_seen` its last beat
    quota:<tenant>       hash: ledger item (job:<id>, dataset:<id>) -> bytes it may take
    quota_total:<tenant> the ledger's sum, kept in step by the charge and release scripts
    dataset_owners:<id>  set of the tenants whose index names an uploaded dataset
    idem:<tenant>:<h>    an Idempotency-Key's first job (24 h)
    event_streams:<t>    sorted set: a tenant's open event streams, scored by expiry
    state_indexes_built  set once every stored job is in the index of its state
"""

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "aetrain"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def lease(self, job_id: str) -> str:
        return f"{self.prefix}:lease:{job_id}"

    def fence(self, job_id: str) -> str:
        return f"{self.prefix}:fence:{job_id}"

    def progress(self, job_id: str) -> str:
        return f"{self.prefix}:progress:{job_id}"

    def metrics(self, job_id: str) -> str:
        return f"{self.prefix}:metrics:{job_id}"

    def job_keys(self, job_id: str) -> list[str]:
        """The keys that hold one job's state in Redis (deleted with the job)."""
        return [self.job(job_id), self.progress(job_id), self.metrics(job_id),
                self.lease(job_id), self.fence(job_id)]  # fmt: skip

    def index(self, tenant: str) -> str:
        return f"{self.prefix}:jobs:{tenant}"

    @property
    def state_indexes_built(self) -> str:
        """Set once the per-state indexes hold every job stored before they existed."""
        return f"{self.prefix}:state_indexes_built"

    def state_index(self, tenant: str, state: str) -> str:
        """A tenant's jobs in one state: a filtered listing reads only these, never them all."""
        return f"{self.prefix}:jobs:{tenant}:{state}"

    def idempotency(self, tenant: str, key: str) -> str:
        return f"{self.prefix}:idem:{tenant}:{hashlib.sha256(key.encode()).hexdigest()}"

    def open_jobs(self, tenant: str) -> str:
        return f"{self.prefix}:open:{tenant}"

    def datasets(self, tenant: str) -> str:
        return f"{self.prefix}:datasets:{tenant}"

    @property
    def active(self) -> str:
        return f"{self.prefix}:active"

    @property
    def scheduler(self) -> str:
        return f"{self.prefix}:scheduler"

    @property
    def waiting(self) -> str:
        return f"{self.prefix}:waiting"

    def group(self, group_id: str) -> str:
        """A warm worker group's channel with its dispatcher (shared/group_channel.py)."""
        return f"{self.prefix}:group:{group_id}"

    @property
    def dispatchers(self) -> str:
        return f"{self.prefix}:dispatchers"

    @property
    def dispatchers_seen(self) -> str:
        return f"{self.prefix}:dispatcher_seen"

    def api_key(self, key_digest: str) -> str:
        return f"{self.prefix}:apikey:{key_digest}"

    def api_key_id(self, key_id: str) -> str:
        return f"{self.prefix}:apikeyid:{key_id}"

    @property
    def api_keys(self) -> str:
        return f"{self.prefix}:apikeys"

    def tenant_queue(self, tenant: str) -> str:
        """A tenant's queued jobs (score: -priority; ties by id = age)."""
        return f"{self.prefix}:queue:{tenant}"

    @property
    def waiting_tenants(self) -> str:
        """Tenants that may have queued jobs (emptied ones are dropped by the claim)."""
        return f"{self.prefix}:waiting_tenants"

    def running(self, tenant: str) -> str:
        """A tenant's running jobs: its share of the cluster, which fair claiming evens out."""
        return f"{self.prefix}:running:{tenant}"

    @property
    def served(self) -> str:
        """Hash: tenant -> when a job of it last started (ms): turns between equal shares."""
        return f"{self.prefix}:served"

    @property
    def tenants(self) -> str:
        """Every tenant that ever submitted: where the janitor looks for stale index entries."""
        return f"{self.prefix}:tenants"

    def submissions(self, tenant: str, minute: int) -> str:
        """A tenant's submissions in one clock minute (the per-minute limit)."""
        return f"{self.prefix}:submissions:{tenant}:{minute}"

    @property
    def changes(self) -> str:
        """Stream of job ids whose record changed (capped): what live event streams wake on."""
        return f"{self.prefix}:changes"

    def quota(self, tenant: str) -> str:
        """A tenant's storage ledger: item (`job:<id>`, `dataset:<id>`) -> bytes charged."""
        return f"{self.prefix}:quota:{tenant}"

    def quota_total(self, tenant: str) -> str:
        """The sum of a tenant's storage ledger, kept in step with it."""
        return f"{self.prefix}:quota_total:{tenant}"

    def dataset_owners(self, dataset_id: str) -> str:
        """Tenants whose index names an upload: its file goes when the last one deletes it."""
        return f"{self.prefix}:dataset_owners:{dataset_id}"

    def event_streams(self, tenant: str) -> str:
        """A tenant's open event streams (scored by expiry, in ms): what its stream cap counts."""
        return f"{self.prefix}:event_streams:{tenant}"

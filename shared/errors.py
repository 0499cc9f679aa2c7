"""Errors of the aetrain domain.

    TrainServiceError
    ├── JobNotFound            no such job (or not the caller's)
    ├── InvalidTransition      a state change the lifecycle does not allow
    ├── LeaseLost              a runner's fencing token is no longer the job's
    ├── ResultNotReady         a result asked for before the job succeeded
    ├── ArtifactNotFound       a name that is not in the job's artifact list
    ├── IdempotencyConflict    an Idempotency-Key reused with another spec
    ├── Unauthenticated        no API key, or one that is malformed, unknown or revoked
    ├── TrainingFailed         the training run ended with an error
    ├── DatasetNotFound        no such uploaded dataset (or not the caller's)
    ├── DatasetInvalid         an upload that is not a dataset we can train on
    ├── UploadTooLarge         an upload past the size cap
    ├── TooManyJobs            a tenant at its limit of queued and running jobs
    ├── RateLimited            a tenant past its submissions per minute
    ├── BodyTooLarge           a JSON request body past its cap
    ├── ForeignOrigin          a request from another site or host to a local, keyless API
    ├── TooManyStreams         a tenant at its limit of open event streams
    ├── QuotaExceeded          a job or upload past the tenant's storage quota or free disk
    └── DatasetInUse           a dataset deleted while a queued or running job uses it

Each error keeps its constructor arguments in ``args`` and formats its message in ``__str__``,
so it survives pickling across processes.
"""


class TrainServiceError(Exception):
    """Base of every aetrain error."""


class JobNotFound(TrainServiceError):
    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:
        return f"job {self.job_id!r} not found"


class InvalidTransition(TrainServiceError):
    def __init__(self, job_id: str, current: str, target: str) -> None:
        super().__init__(job_id, current, target)
        self.job_id, self.current, self.target = job_id, current, target

    def __str__(self) -> str:
        return f"job {self.job_id!r} is {self.current}; it cannot become {self.target}"


class LeaseLost(TrainServiceError):
    def __init__(self, job_id: str, token: int) -> None:
        super().__init__(job_id, token)
        self.job_id, self.token = job_id, token

    def __str__(self) -> str:
        return f"lease of job {self.job_id!r} with fencing token {self.token} is no longer held"


class ResultNotReady(TrainServiceError):
    def __init__(self, job_id: str, state: str, error: str | None = None) -> None:
        super().__init__(job_id, state, error)
        self.job_id, self.state, self.error = job_id, state, error

    def __str__(self) -> str:
        text = f"job {self.job_id!r} is {self.state}; its result exists once it has succeeded"
        return f"{text} (error: {self.error})" if self.error else text


class ArtifactNotFound(TrainServiceError):
    def __init__(self, job_id: str, name: str) -> None:
        super().__init__(job_id, name)
        self.job_id, self.name = job_id, name

    def __str__(self) -> str:
        return f"job {self.job_id!r} has no artifact named {self.name!r}"


class IdempotencyConflict(TrainServiceError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"Idempotency-Key {self.key!r} was already used with a different spec"


class Unauthenticated(TrainServiceError):
    """One message for every bad key, so that a caller learns nothing about which keys exist."""

    def __str__(self) -> str:
        return "missing or invalid API key"


class TrainingFailed(TrainServiceError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class DatasetNotFound(TrainServiceError):
    def __init__(self, dataset_id: str) -> None:
        super().__init__(dataset_id)
        self.dataset_id = dataset_id

    def __str__(self) -> str:
        return f"no dataset {self.dataset_id!r}"


class DatasetInvalid(TrainServiceError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(field, reason)
        self.field, self.reason = field, reason

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


class UploadTooLarge(TrainServiceError):
    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes)
        self.max_bytes = max_bytes

    def __str__(self) -> str:
        return f"the upload is larger than the limit of {self.max_bytes} bytes"


class TooManyJobs(TrainServiceError):
    def __init__(self, tenant: str, limit: int) -> None:
        super().__init__(tenant, limit)
        self.tenant, self.limit = tenant, limit

    def __str__(self) -> str:
        return (f"tenant {self.tenant!r} has {self.limit} jobs queued or running, its limit; "
                "submit again when one has finished")  # fmt: skip


class RateLimited(TrainServiceError):
    def __init__(self, tenant: str, limit: int, retry_after_s: int = 60) -> None:
        super().__init__(tenant, limit, retry_after_s)
        self.tenant, self.limit, self.retry_after_s = tenant, limit, retry_after_s

    def __str__(self) -> str:
        return (f"tenant {self.tenant!r} has submitted {self.limit} jobs this minute, its "
                f"limit; try again in {self.retry_after_s} s")  # fmt: skip



class BodyTooLarge(TrainServiceError):
    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes)
        self.max_bytes = max_bytes

    def __str__(self) -> str:
        return (f"the request body is larger than the limit of {self.max_bytes} bytes "
                "(AETRAIN_MAX_BODY_BYTES)")  # fmt: skip


class ForeignOrigin(TrainServiceError):
    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what

    def __str__(self) -> str:
        return (f"refused: {self.what}. With auth off the API answers only requests addressed "
                "to a loopback host from no other site (DNS rebinding and cross-site requests "
                "could reach it otherwise)")  # fmt: skip


class TooManyStreams(TrainServiceError):
    def __init__(self, tenant: str, limit: int) -> None:
        super().__init__(tenant, limit)
        self.tenant, self.limit = tenant, limit

    def __str__(self) -> str:
        return (f"tenant {self.tenant!r} has {self.limit} event streams open, its limit; close "
                "one or poll GET /v1/jobs/{id}")  # fmt: skip


class QuotaExceeded(TrainServiceError):
    def __init__(self, what: str, needed: int, available: int) -> None:
        super().__init__(what, needed, available)
        self.what, self.needed, self.available = what, needed, available

    def __str__(self) -> str:
        return (f"{self.what} needs about {self.needed:,} bytes of storage but only "
                f"{self.available:,} are left")  # fmt: skip


class DatasetInUse(TrainServiceError):
    def __init__(self, dataset_id: str, job_ids: list[str]) -> None:
        super().__init__(dataset_id, job_ids)
        self.dataset_id, self.job_ids = dataset_id, job_ids

    def __str__(self) -> str:
        return (f"dataset {self.dataset_id!r} is used by queued or running jobs "
                f"{', '.join(self.job_ids)}; delete it once they have finished")  # fmt: skip

"""aetrain's public Python API: `from aetrain import Client`.

Importing it is light (httpx, pydantic, PyYAML): torch is imported only by
`Client.load_encoder`, and nothing of the server (FastAPI, Redis, Ray) is imported at all.
"""

from aetrain.client import Client
from aetrain.errors import (
    ApiError,
    Conflict,
    ConnectionFailed,
    Forbidden,
    InsufficientStorage,
    JobTimeout,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServiceUnavailable,
    Unauthorized,
    ValidationFailed,
)
from aetrain.spec_file import SpecFileError
from aetrain.types import Dataset, DatasetList, Event, Job, JobPage, JobResult, Stage

__all__ = [
    "ApiError",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "Dataset",
    "DatasetList",
    "Event",
    "Forbidden",
    "InsufficientStorage",
    "Job",
    "JobPage",
    "JobResult",
    "JobTimeout",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "ServiceUnavailable",
    "SpecFileError",
    "Stage",
    "Unauthorized",
    "ValidationFailed",
]

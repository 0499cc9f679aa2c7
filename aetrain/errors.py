"""Errors of the Python client, one class per kind of answer, so that callers catch what they
can act on (`except RateLimited as exc: time.sleep(exc.retry_after_s)`).

    ApiError                 a call failed; `status` is the HTTP status (None: no answer)
    ├── ConnectionFailed     the API could not be reached (or the connection broke)
    ├── Unauthorized         401: no API key, or one that is unknown or revoked
    ├── Forbidden            403: auth off and a foreign Host or Origin
    ├── NotFound             404: no such job, dataset or artifact (or not the caller's)
    ├── Conflict             409: not in a state that allows it (result before success, ...)
    ├── PayloadTooLarge      413: a body or upload past its cap
    ├── ValidationFailed     422: a spec, query or upload refused; `errors` names each field
    ├── RateLimited          429: past a tenant limit; `retry_after_s` says when to try again
    ├── ServiceUnavailable   503: Redis down or refusing writes; `retry_after_s`
    └── InsufficientStorage  507: past the storage quota or the free-disk floor
    JobTimeout (TimeoutError) `Client.wait` gave up before the job ended

The message of each is the API's own `detail`, prefixed with the status, as the CLI prints it.
"""

from typing import Any

import httpx


class ApiError(Exception):
    """The API answered with an error, or could not be reached; the message says which."""

    status: int | None = None

    def __init__(self, message: str, status: int | None = None, detail: Any = None) -> None:
        super().__init__(message, status, detail)
        self.message, self.status, self.detail = message, status, detail

    def __str__(self) -> str:
        return self.message


class ConnectionFailed(ApiError):
    pass


class Unauthorized(ApiError):
    pass


class Forbidden(ApiError):
    pass


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    pass


class PayloadTooLarge(ApiError):
    pass


class ValidationFailed(ApiError):
    @property
    def errors(self) -> list[dict[str, Any]]:
        """Each refused field as `{field, loc, msg, type}` (`field` is a dotted path)."""
        if not isinstance(self.detail, list):
            return []
        return [error for error in self.detail if isinstance(error, dict)]


class _RetryLater(ApiError):
    def __init__(self, message: str, status: int | None = None, detail: Any = None,
                 retry_after_s: float | None = None) -> None:  # fmt: skip
        super().__init__(message, status, detail)
        self.args = (message, status, detail, retry_after_s)  # so that a copy keeps it
        self.retry_after_s = retry_after_s


class RateLimited(_RetryLater):
    pass


class ServiceUnavailable(_RetryLater):
    pass


class InsufficientStorage(ApiError):
    pass


class JobTimeout(TimeoutError):
    def __init__(self, job_id: str, state: str, timeout_s: float) -> None:
        super().__init__(job_id, state, timeout_s)
        self.job_id, self.state, self.timeout_s = job_id, state, timeout_s

    def __str__(self) -> str:
        return f"job {self.job_id!r} is still {self.state} after {self.timeout_s:g} s"


_BY_STATUS: dict[int, type[ApiError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: ValidationFailed,
    429: RateLimited,
    503: ServiceUnavailable,
    507: InsufficientStorage,
}


def describe(detail: Any, fallback: str) -> str:
    """The API's `detail` as one line: a string as it is, a 422's list as `field: msg; ...`."""
    if isinstance(detail, list):
        return "; ".join(
            f"{d.get('field', '?')}: {d.get('msg', '')}" if isinstance(d, dict) else str(d)
            for d in detail
        )
    return fallback if detail is None else str(detail)


def error_for(response: httpx.Response) -> ApiError:
    """The error an answer of status 400 or more stands for. Reads the body: a streamed answer
    must be read first."""
    try:
        body = response.json()
        detail = body.get("detail") if isinstance(body, dict) else None
    except ValueError:  # not JSON: a proxy's page, say
        body, detail = None, None
    text = describe(detail, response.text or response.reason_phrase)
    status = response.status_code
    message = f"HTTP {status}: {text}"
    if status == 401:
        message += "; set AETRAIN_API_KEY to a key from `aetrain keys create --tenant NAME`"
    cls = _BY_STATUS.get(status, ApiError)
    if issubclass(cls, _RetryLater):
        return cls(message, status, detail, _retry_after(response))
    return cls(message, status, detail)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        return float(value)
    except ValueError:  # absent, or an HTTP date (the API sends seconds)
        return None

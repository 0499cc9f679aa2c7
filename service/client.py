"""A small HTTP client of the aetrain API, used by the CLI."""

from typing import Any

import httpx


class ApiError(Exception):
    """The API answered with an error, or could not be reached; the message says which."""


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        return response.text or response.reason_phrase
    if isinstance(detail, list):
        return "; ".join(f"{d.get('field', '?')}: {d.get('msg', '')}" for d in detail)
    return str(detail)


class Client:
    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiError(
                f"cannot reach the aetrain API at {self.url} ({exc}); is `aetrain up` running?"
            ) from None
        if response.status_code == 401:
            raise ApiError(
                f"HTTP 401: {_detail(response)}; set AETRAIN_API_KEY to a key from "
                "`aetrain keys create --tenant NAME`"
            )
        if response.status_code >= 400:
            raise ApiError(f"HTTP {response.status_code}: {_detail(response)}")
        return response

    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        job: dict[str, Any] = self.request("POST", "/v1/jobs", json=spec, headers=headers).json()
        return job

    def get(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self.request("GET", f"/v1/jobs/{job_id}").json()
        return job

    def list(self, state: str | None = None, limit: int = 50) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, **({"state": state} if state else {})}
        page: dict[str, Any] = self.request("GET", "/v1/jobs", params=params).json()
        return page

    def cancel(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self.request("POST", f"/v1/jobs/{job_id}/cancel").json()
        return job

    def delete(self, job_id: str) -> None:
        """Delete a finished job with its files (the API refuses a queued or running one)."""
        self.request("DELETE", f"/v1/jobs/{job_id}")

    def result(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/v1/jobs/{job_id}/result").json()
        return result

    def encoder(self, job_id: str, fmt: str) -> bytes:
        response = self.request("GET", f"/v1/jobs/{job_id}/encoder", params={"format": fmt})
        return response.content

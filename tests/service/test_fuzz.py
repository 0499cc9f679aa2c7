"""Property-based fuzzing of the HTTP API from its own OpenAPI document (schemathesis).

Every operation gets generated requests, valid and invalid; no answer may be a 5xx, and an
answer with a documented status must match its documented schema and content type. Auth is
off; most requests that take a job id name a real job (succeeded with artifacts, or queued) and
most artifact names are real ones, so more than the 404 branch is reached.

schemathesis's pytest integration (`from_fixture`) breaks on pytest 9 (schemathesis 4.32 sets
`node._nodeid`, which pytest 9 no longer has), so its strategies are driven with plain
hypothesis, one test per operation.
"""

from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from service.app import create_app
from shared.jobs import JobRecord
from shared.settings import Settings
from shared.specs import parse_job_spec
from shared.storage import LocalStorage
from shared.store import JobStore
from tests.service.helpers import ARTIFACTS, succeeded_job
from tests.specs import digits_spec

CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]


def operation_labels() -> list[str]:
    # The document does not depend on Redis, so an app that never connects can describe it.
    unused = Settings(redis_url="redis://127.0.0.1:1/0", auth="off")
    paths = create_app(unused).openapi()["paths"]
    return [f"{method.upper()} {path}" for path, methods in paths.items() for method in methods]


def known_gap(case: schemathesis.Case[Any], response: Any) -> list[Any] | None:
    """The checks for an answer that differs from the document in a known way; None if none.

    - schemathesis checks each Server-Sent Event against the `text/event-stream` schema, which
      OpenAPI 3.1 (FastAPI's) means for the whole stream: a string.
    - A submission past the tenant's storage quota is a 507 (docs/api.md), a 5xx: a valid
      spec may keep 100 checkpoints of a wide mnist5k stack, ~30 GB by its estimate, past
      the default 20 GiB (once in a full run).
    """
    label, status = case.operation.label, response.status_code
    if label == "GET /v1/jobs/{job_id}/events" and status == 200:
        return [not_a_server_error, content_type_conformance]
    if label == "POST /v1/jobs" and status == 507:
        assert "AETRAIN_STORAGE_QUOTA_BYTES" in response.text, response.text
        return [content_type_conformance]
    return None


@pytest.mark.parametrize("label", operation_labels())
def test_operation_never_fails_and_matches_its_schema(
    label: str, settings: Settings, store: JobStore, storage: LocalStorage
) -> None:
    done = succeeded_job(store, storage)
    queued, _ = store.submit(JobRecord.for_spec(parse_job_spec(digits_spec())))
    real_ids = [done.id, queued.id]
    store.dispatchers.register("fuzz", {"id": "fuzz"}, ttl_s=600)  # /readyz: 200, not its 503
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(settings))
    operation = schema.find_operation_by_label(label)
    assert operation is not None
    cases = st.one_of(
        operation.as_strategy(schemathesis.GenerationMode.POSITIVE),
        operation.as_strategy(schemathesis.GenerationMode.NEGATIVE),
    )

    @given(
        case=cases,
        real=st.sampled_from([None, 0, 1]),
        artifact=st.sampled_from([None, *ARTIFACTS]),
    )
    @hypothesis_settings(
        max_examples=25,
        deadline=None,
        database=None,  # leaves no .hypothesis/ folder behind
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    def fuzz(case: schemathesis.Case[Any], real: int | None, artifact: str | None) -> None:
        params = case.path_parameters or {}
        if real is not None and "job_id" in params:
            # the events of a queued job never end: only the finished one's are read to the end
            params["job_id"] = real_ids[0 if label.endswith("/events") else real]
        if artifact is not None and "name" in params:
            params["name"] = artifact
        response = case.call(timeout=10)
        case.validate_response(response, checks=known_gap(case, response) or CHECKS)

    try:
        fuzz()
    finally:
        shutdown_lifespans()  # schemathesis keeps an app's lifespan (its Redis client) open


# -- what the fuzzing found, pinned ---------------------------------------------------------------


@pytest.mark.parametrize(
    "last_event_id", ["99999999999999999999-0", "0-99999999999999999999", "1-" + "9" * 61]
)
def test_a_last_event_id_past_64_bits_is_422_not_a_broken_stream(
    client: TestClient, store: JobStore, storage: LocalStorage, last_event_id: str
) -> None:
    done = succeeded_job(store, storage)
    response = client.get(f"/v1/jobs/{done.id}/events", headers={"Last-Event-ID": last_event_id})
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "last-event-id"


def test_the_largest_accepted_last_event_id_streams_to_the_end(
    client: TestClient, store: JobStore, storage: LocalStorage
) -> None:
    done = succeeded_job(store, storage)
    headers = {"Last-Event-ID": "9999999999999999999-9999999999999999999"}
    response = client.get(f"/v1/jobs/{done.id}/events", headers=headers)
    assert response.status_code == 200
    assert "event: end" in response.text


def test_downloads_are_not_typed_by_guessing(
    client: TestClient, store: JobStore, storage: LocalStorage
) -> None:
    """mimetypes calls a .pt file a SNES page table and anything unknown text/plain."""
    done = succeeded_job(store, storage)
    for path in ("artifacts/encoder.pt", "artifacts/encoder.safetensors", "encoder"):
        response = client.get(f"/v1/jobs/{done.id}/{path}")
        assert response.headers["content-type"] == "application/octet-stream", path
    response = client.get(f"/v1/jobs/{done.id}/artifacts/model.json")
    assert response.headers["content-type"] == "application/json"

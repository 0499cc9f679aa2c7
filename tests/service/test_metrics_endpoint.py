"""GET /metrics on a real Redis: jobs by tenant and state read at scrape time at a cost that
does not grow with the jobs; a key with auth on (or a port of its own); request latency by
route template, so no client can grow the label sets; the job on the API's log lines."""

import io
import json
import logging
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from shared.jobs import JobRecord
from shared.logs import ContextFilter, JsonFormatter
from shared.settings import Settings
from shared.specs import parse_job_spec
from shared.storage import LocalStorage
from shared.store import JobStore
from tests.conftest import free_port
from tests.service.helpers import succeeded_job
from tests.specs import digits_spec

pytestmark = pytest.mark.timeout(120)

LATENCY = "aetrain_http_request_duration_seconds"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(text: str) -> Samples:
    """Every sample of an exposition: (name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def latency_label_sets(samples: Samples) -> set[tuple[tuple[str, str], ...]]:
    return {labels for name, labels in samples if name == f"{LATENCY}_count"}


def submit(store: JobStore, tenant: str, n: int = 1) -> list[JobRecord]:
    jobs = [JobRecord.for_spec(parse_job_spec(digits_spec()), tenant=tenant) for _ in range(n)]
    return [store.submit(job)[0] for job in jobs]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def commands_run(store: JobStore) -> int:
    """Commands Redis has run, but for the event hub's reads of its change stream."""
    stats = store.redis.info("commandstats")
    return sum(int(entry["calls"]) for name, entry in stats.items()
               if not name.startswith("cmdstat_x") and name != "cmdstat_info")  # fmt: skip


# -- job counts ----------------------------------------------------------------------------------


def test_jobs_are_counted_by_tenant_and_state(
    client: TestClient, store: JobStore, storage: LocalStorage
) -> None:
    succeeded_job(store, storage, tenant="alice")
    submit(store, "alice", 2)
    submit(store, "bob", 3)
    running = store.claim("test-runner", lease_ttl_s=30.0, block_ms=50)
    assert running is not None and running.job.tenant == "bob"  # fair: alice had her turn
    store.request_cancel(submit(store, "bob")[0].id)
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples = scrape(response.text)
    expected = {
        ("alice", "queued"): 2, ("alice", "running"): 0, ("alice", "succeeded"): 1,
        ("bob", "queued"): 2, ("bob", "running"): 1, ("bob", "cancelled"): 1,
        ("bob", "failed"): 0,
    }  # fmt: skip
    for (tenant, state), count in expected.items():
        assert value(samples, "aetrain_jobs", tenant=tenant, state=state) == count, (tenant, state)
    assert value(samples, "aetrain_queue_depth", tenant="alice") == 2
    assert value(samples, "aetrain_queue_depth", tenant="bob") == 2
    assert value(samples, "aetrain_jobs_active") == 1
    assert value(samples, "aetrain_redis_up") == 1
    assert value(samples, "aetrain_dispatchers") == 0


def test_a_scrape_costs_the_same_redis_commands_with_3_jobs_or_60(
    client: TestClient, store: JobStore
) -> None:
    submit(store, "alice", 3)
    client.get("/metrics")  # the first scrape loads the scripts of nothing: warm anyway
    before = commands_run(store)
    client.get("/metrics")
    with_3 = commands_run(store) - before
    assert with_3 > 0  # the counts are read from Redis
    submit(store, "alice", 57)
    before = commands_run(store)
    client.get("/metrics")
    assert commands_run(store) - before == with_3
    submit(store, "bob")  # a tenant more: (states + 1) more counts
    before = commands_run(store)
    client.get("/metrics")
    assert commands_run(store) - before == with_3 + 6


# -- who may read them ---------------------------------------------------------------------------


def test_with_auth_on_metrics_need_a_live_key(auth_settings: Settings, store: JobStore) -> None:
    key_id, key = store.api_keys.create("alice")
    with TestClient(create_app(auth_settings)) as api:
        assert api.get("/metrics").status_code == 401
        assert api.get("/metrics", headers=bearer(key + "x")).status_code == 401
        assert api.get("/metrics", headers=bearer(key)).status_code == 200
        store.api_keys.revoke(key_id)
        assert api.get("/metrics", headers=bearer(key)).status_code == 401


def test_metrics_tenant_limits_which_keys_may_read(
    auth_settings: Settings, store: JobStore
) -> None:
    _, alice = store.api_keys.create("alice")
    _, ops = store.api_keys.create("ops")
    settings = auth_settings.model_copy(update={"metrics_tenant": "ops"})
    with TestClient(create_app(settings)) as api:
        refused = api.get("/metrics", headers=bearer(alice))
        assert refused.status_code == 401  # as a bad key: it says nothing of who may
        assert refused.json() == {"detail": "missing or invalid API key"}
        assert api.get("/metrics", headers=bearer(ops)).status_code == 200


def test_on_a_port_of_their_own_metrics_need_no_key_and_leave_the_api(
    auth_settings: Settings, store: JobStore
) -> None:
    submit(store, "alice")
    port = free_port()
    settings = auth_settings.model_copy(update={"metrics_port": port})
    with TestClient(create_app(settings)) as api:
        assert api.get("/metrics").status_code == 404
        assert "/metrics" not in api.get("/openapi.json").json()["paths"]
        response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert response.status_code == 200
        assert value(scrape(response.text), "aetrain_jobs", tenant="alice", state="queued") == 1
    with pytest.raises(httpx.ConnectError):  # closed with the app
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_metrics_are_the_text_format_whatever_the_accept_header_says(client: TestClient) -> None:
    for accept in ["application/openmetrics-text; version=1.0.0", "text/plain; version=abc",
                   "text/plain; version=1.x; escaping=values", "*/*"]:  # fmt: skip
        response = client.get("/metrics", headers={"Accept": accept})
        assert response.status_code == 200, accept
        assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"


def test_metrics_without_redis_say_so_instead_of_failing(settings: Settings) -> None:
    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    with TestClient(create_app(down)) as api:
        response = api.get("/metrics")
    assert response.status_code == 200
    samples = scrape(response.text)
    assert value(samples, "aetrain_redis_up") == 0
    assert not any(name == "aetrain_jobs" for name, _ in samples)


# -- request latency -----------------------------------------------------------------------------


def test_latency_is_labelled_by_route_template(client: TestClient, store: JobStore) -> None:
    first, second = submit(store, "default", 2)
    assert client.get(f"/v1/jobs/{first.id}").status_code == 200
    assert client.get(f"/v1/jobs/{second.id}").status_code == 200
    assert client.get("/v1/jobs/j0000").status_code == 404
    samples = scrape(client.get("/metrics").text)
    route = "/v1/jobs/{job_id}"
    assert value(samples, f"{LATENCY}_count", method="GET", route=route, status="200") == 2
    assert value(samples, f"{LATENCY}_count", method="GET", route=route, status="404") == 1
    assert not any(first.id in str(labels) for _, labels in samples)


def test_a_flood_of_made_up_urls_and_methods_does_not_grow_the_label_sets(
    client: TestClient,
) -> None:
    client.get("/healthz")
    client.get("/no/such/page")
    client.request("BREW", "/v1/jobs")
    baseline = latency_label_sets(scrape(client.get("/metrics").text))
    for i in range(200):
        token = secrets.token_hex(8)
        client.get(f"/{token}/{i}?q={token}")
        client.get(f"/v1/jobs/{token}")
        client.request(f"M{token[:6].upper()}", f"/v1/{token}")
        client.get(f"/healthz/{token}")
    samples = scrape(client.get("/metrics").text)
    flooded = latency_label_sets(samples)
    routes = {dict(labels)["route"] for labels in flooded}
    methods = {dict(labels)["method"] for labels in flooded}
    assert routes <= {"/healthz", "/metrics", "/v1/jobs", "/v1/jobs/{job_id}", "unmatched"}
    assert methods <= {"GET", "other"}
    assert len(flooded) <= len(baseline) + 3  # /metrics itself, the 404 of a job, ...
    assert len(flooded) < 12


def test_requests_refused_before_routing_are_timed_too(
    auth_settings: Settings, store: JobStore
) -> None:
    with TestClient(create_app(auth_settings)) as api:
        assert api.get("/v1/jobs").status_code == 401
        _, key = store.api_keys.create("ops")
        samples = scrape(api.get("/metrics", headers=bearer(key)).text)
    assert value(samples, f"{LATENCY}_count", method="GET", route="unmatched", status="401") == 1


# -- log lines -----------------------------------------------------------------------------------


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """The root logger's lines as aetrain writes them off a terminal."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


def lines_of(stream: io.StringIO, logger: str) -> list[dict[str, Any]]:
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [entry for entry in entries if entry["logger"] == logger]


def test_the_api_names_the_job_and_stage_on_the_lines_of_a_request(
    settings: Settings, store: JobStore, json_lines: io.StringIO
) -> None:
    app = create_app(settings)
    probe = logging.getLogger("aetrain.test.probe")

    def sync_probe(job_id: str) -> dict[str, str]:  # a sync route runs in a thread
        probe.info("sync")
        return {}

    async def async_probe(job_id: str) -> dict[str, str]:
        probe.info("async")
        return {}

    async def no_job() -> dict[str, str]:
        probe.info("no job")
        return {}

    app.add_api_route("/v1/jobs/{job_id}/sync-probe", sync_probe)
    app.add_api_route("/v1/jobs/{job_id}/async-probe", async_probe)
    app.add_api_route("/probe", no_job)
    with TestClient(app) as api:
        assert api.get("/v1/jobs/j0123abc/sync-probe?stage=layer2").status_code == 200
        assert api.get("/v1/jobs/j0456def/async-probe").status_code == 200
        assert api.get("/probe").status_code == 200  # the last request's job is not this one's
        assert api.get("/v1/jobs/a%0Ab/sync-probe?stage=x%0Ay").status_code == 200
    got = [(e["message"], e.get("job_id"), e.get("stage"))
           for e in lines_of(json_lines, "aetrain.test.probe")]  # fmt: skip
    assert got == [
        ("sync", "j0123abc", "layer2"), ("async", "j0456def", None), ("no job", None, None),
        ("sync", None, None),  # a made-up id with a newline stays off the line's fields
    ]  # fmt: skip

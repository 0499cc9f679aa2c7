"""API keys and tenants over HTTP, on a real Redis: one 401 for every bad key; keys stored only
as hashes; another tenant's job is a 404 exactly like an unknown one; `aetrain keys`."""

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from service.app import create_app
from service.cli import app as cli_app
from shared.settings import Settings
from shared.storage import LocalStorage
from shared.store import JobStore
from tests.conftest import free_port
from tests.service.helpers import artifact_bytes, serve, succeeded_job
from tests.specs import digits_spec

UNAUTHENTICATED = {"detail": "missing or invalid API key"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def api(auth_settings: Settings, store: JobStore) -> Iterator[TestClient]:
    with TestClient(create_app(auth_settings)) as client:
        yield client


def assert_unauthenticated(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.json() == UNAUTHENTICATED
    assert response.headers["www-authenticate"] == "Bearer"


# -- keys ---------------------------------------------------------------------------------------


def test_every_bad_key_gets_the_same_401(api: TestClient, store: JobStore) -> None:
    key_id, key = store.api_keys.create("alice")
    revoked_id, revoked = store.api_keys.create("alice")
    assert store.api_keys.revoke(revoked_id)
    unknown = f"aet_{key_id[::-1]}_{key.split('_', 2)[2]}"  # well-formed, never issued
    bad_headers: list[dict[str, str]] = [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": f"Basic {key}"},
        {"Authorization": key},
        {"Authorization": f"Bearer {key}x"},
        {"Authorization": f"Bearer {key[:-1]}"},
        {"Authorization": f"Bearer {key.upper()}"},
        {"Authorization": f"Bearer {key_id}"},
        {"Authorization": f"Bearer {hashlib.sha256(key.encode()).hexdigest()}"},
        {"Authorization": "Bearer " + "a" * 5000},
        bearer("not-a-key"),
        bearer(unknown),
        bearer(revoked),
    ]
    for headers in bad_headers:
        assert_unauthenticated(api.get("/v1/jobs", headers=headers))
        assert_unauthenticated(api.post("/v1/jobs", json=digits_spec(), headers=headers))
        assert_unauthenticated(api.get("/v1/jobs/j-whatever", headers=headers))
    assert api.get("/v1/jobs", headers=bearer(key)).status_code == 200


def test_a_valid_key_acts_as_its_tenant(api: TestClient, store: JobStore) -> None:
    _, key = store.api_keys.create("alice")
    created = api.post("/v1/jobs", json=digits_spec(), headers=bearer(key))
    assert created.status_code == 201
    assert store.get(created.json()["id"]).tenant == "alice"
    listed = api.get("/v1/jobs", headers=bearer(key)).json()["items"]
    assert [job["id"] for job in listed] == [created.json()["id"]]


def test_a_revoked_key_stops_working_at_once(api: TestClient, store: JobStore) -> None:
    key_id, key = store.api_keys.create("alice")
    _, other = store.api_keys.create("alice")
    assert api.get("/v1/jobs", headers=bearer(key)).status_code == 200
    assert store.api_keys.revoke(key_id)
    assert_unauthenticated(api.get("/v1/jobs", headers=bearer(key)))
    assert api.get("/v1/jobs", headers=bearer(other)).status_code == 200  # only that key
    assert not store.api_keys.revoke(key_id)
    assert not store.api_keys.revoke("000000000000")
    listed = {info["key_id"]: info for info in store.api_keys.list("alice")}
    assert listed[key_id]["revoked_at"] is not None


def test_list_api_keys_filters_by_tenant_and_never_shows_a_secret(store: JobStore) -> None:
    made = [store.api_keys.create(tenant) for tenant in ("alice", "bob", "alice")]
    everything = store.api_keys.list()
    assert [info["key_id"] for info in everything] == [key_id for key_id, _ in made]
    assert [info["tenant"] for info in store.api_keys.list("alice")] == ["alice", "alice"]
    assert set(everything[0]) == {"key_id", "tenant", "created_at", "revoked_at", "max_priority"}
    for _, key in made:
        assert key not in repr(everything)


@pytest.mark.parametrize("tenant", ["", "Alice", "-x", "a b", "a/b", "x" * 64, "é"])
def test_a_bad_tenant_name_is_refused(store: JobStore, tenant: str) -> None:
    with pytest.raises(ValueError, match="tenant"):
        store.api_keys.create(tenant)
    assert store.api_keys.list() == []


READ_ALL = {
    "string": lambda r, name: r.get(name),
    "hash": lambda r, name: r.hgetall(name),
    "set": lambda r, name: r.smembers(name),
    "zset": lambda r, name: r.zrange(name, 0, -1, withscores=True),
    "list": lambda r, name: r.lrange(name, 0, -1),
    "stream": lambda r, name: r.xrange(name),
}


def redis_contents(store: JobStore) -> str:
    """Every key name and every value in Redis, whatever its type, as one text."""
    parts = []
    for name in store.redis.scan_iter(count=1000):
        kind = store.redis.type(name)
        parts.append(f"{name} {kind} {READ_ALL[kind](store.redis, name)!r}")
    return "\n".join(parts)


def test_keys_are_stored_only_as_hashes(api: TestClient, store: JobStore) -> None:
    keys = [store.api_keys.create(tenant)[1] for tenant in ("alice", "bob")]
    for key in keys:  # a request leaves no trace of the key either
        assert api.post("/v1/jobs", json=digits_spec(), headers=bearer(key)).status_code == 201
    contents = redis_contents(store)
    for key in keys:
        secret = key.split("_", 2)[2]
        assert secret not in contents and key not in contents
        assert hashlib.sha256(key.encode()).hexdigest() in contents  # what is kept instead


# -- which routes need a key --------------------------------------------------------------------


def test_every_v1_route_needs_a_key_and_health_does_not(api: TestClient) -> None:
    paths = api.get("/openapi.json").json()["paths"]  # also lists routes added later
    v1 = {path: ops for path, ops in paths.items() if path.startswith("/v1/")}
    assert len(v1) >= 7
    for template, operations in v1.items():
        path = re.sub(r"\{(\w+)\}", r"x-\1", template)
        for method, operation in operations.items():
            assert_unauthenticated(api.request(method.upper(), path))
            assert {"HTTPBearer": []} in operation["security"], (method, template)
    assert api.get("/healthz").status_code == 200
    assert api.get("/readyz").status_code == 503  # no dispatcher, but not a 401


# -- tenants ------------------------------------------------------------------------------------


def blanked(job_id: str, response: httpx.Response) -> str:
    """A response body with its job id blanked, so that two 404s compare whole."""
    return response.text.replace(job_id, "ID")


def job_requests(job_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        ("GET", f"/v1/jobs/{job_id}", {}),
        ("POST", f"/v1/jobs/{job_id}/cancel", {}),
        ("GET", f"/v1/jobs/{job_id}/result", {}),
        ("GET", f"/v1/jobs/{job_id}/artifacts/encoder.pt", {}),
        ("GET", f"/v1/jobs/{job_id}/artifacts/result.json", {}),
        ("GET", f"/v1/jobs/{job_id}/encoder", {}),
        ("GET", f"/v1/jobs/{job_id}/encoder?format=safetensors", {}),
        ("POST", f"/v1/jobs/{job_id}/interpolate", {"json": {"a": 0, "b": 1}}),
    ]


def test_another_tenants_job_is_a_404_exactly_like_an_unknown_one(
    api: TestClient, store: JobStore, storage: LocalStorage
) -> None:
    done = succeeded_job(store, storage, tenant="alice")
    _, alice = store.api_keys.create("alice")
    _, bob = store.api_keys.create("bob")
    queued = api.post("/v1/jobs", json=digits_spec(), headers=bearer(alice)).json()["id"]
    bobs = api.post("/v1/jobs", json=digits_spec(), headers=bearer(bob)).json()["id"]

    alice_list = api.get("/v1/jobs", headers=bearer(alice)).json()["items"]
    assert [job["id"] for job in alice_list] == [queued, done.id]
    bob_list = api.get("/v1/jobs", headers=bearer(bob)).json()["items"]
    assert [job["id"] for job in bob_list] == [bobs]
    for state in ("queued", "succeeded"):
        filtered = api.get("/v1/jobs", params={"state": state}, headers=bearer(bob)).json()
        assert all(job["id"] == bobs for job in filtered["items"])

    unknown = "j-00000000000000000000"
    for job_id in (done.id, queued):
        for (method, path, kwargs), (_, unknown_path, _) in zip(
            job_requests(job_id), job_requests(unknown), strict=True
        ):
            theirs = api.request(method, path, headers=bearer(bob), **kwargs)
            nobodys = api.request(method, unknown_path, headers=bearer(bob), **kwargs)
            assert (theirs.status_code, nobodys.status_code) == (404, 404), (method, path)
            assert blanked(job_id, theirs) == blanked(unknown, nobodys), (method, path)
            assert theirs.headers.get("content-type") == nobodys.headers.get("content-type")

    # bob's attempts changed nothing, and alice still reads it all
    assert api.get(f"/v1/jobs/{queued}", headers=bearer(alice)).json()["state"] == "queued"
    assert api.get(f"/v1/jobs/{done.id}/result", headers=bearer(alice)).status_code == 200
    served = api.get(f"/v1/jobs/{done.id}/artifacts/encoder.pt", headers=bearer(alice))
    assert served.status_code == 200 and served.content == artifact_bytes(done.id, "encoder.pt")
    assert api.post(f"/v1/jobs/{bobs}/cancel", headers=bearer(alice)).status_code == 404
    assert api.get(f"/v1/jobs/{bobs}", headers=bearer(bob)).json()["state"] == "queued"


def test_idempotency_keys_are_per_tenant(api: TestClient, store: JobStore) -> None:
    _, alice = store.api_keys.create("alice")
    _, bob = store.api_keys.create("bob")
    same = {"Idempotency-Key": "shared-name"}
    first = api.post("/v1/jobs", json=digits_spec(), headers={**bearer(alice), **same})
    second = api.post("/v1/jobs", json=digits_spec(), headers={**bearer(bob), **same})
    assert (first.status_code, second.status_code) == (201, 201)
    assert first.json()["id"] != second.json()["id"]


# -- the CLI ------------------------------------------------------------------------------------


def test_keys_create_prints_a_key_that_authenticates(
    api: TestClient, redis_url: str, tmp_path: Path
) -> None:
    env = {"AETRAIN_REDIS_URL": redis_url, "AETRAIN_HOME": str(tmp_path / "home")}
    created = CliRunner().invoke(cli_app, ["keys", "create", "--tenant", "carol"], env=env)
    assert created.exit_code == 0, created.output
    key = created.stdout.strip().splitlines()[-1]
    assert api.get("/v1/jobs", headers=bearer(key)).status_code == 200

    listed = CliRunner().invoke(cli_app, ["keys", "list"], env=env)
    assert listed.exit_code == 0 and "carol" in listed.stdout
    assert key.split("_", 2)[2] not in listed.stdout
    key_id = key.split("_")[1]
    assert key_id in listed.stdout
    revoked = CliRunner().invoke(cli_app, ["keys", "revoke", key_id], env=env)
    assert revoked.exit_code == 0, revoked.output
    assert_unauthenticated(api.get("/v1/jobs", headers=bearer(key)))
    again = CliRunner().invoke(cli_app, ["keys", "revoke", key_id], env=env)
    assert again.exit_code == 1 and "no live API key" in again.stderr


def test_keys_find_the_embedded_redis_and_refuse_a_bad_tenant(
    store: JobStore, redis_url: str, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    env: dict[str, str | None] = {"AETRAIN_REDIS_URL": None, "AETRAIN_HOME": str(home)}
    nowhere = CliRunner().invoke(cli_app, ["keys", "list"], env=env)
    assert nowhere.exit_code == 1 and "AETRAIN_REDIS_URL" in nowhere.stderr
    home.mkdir()
    (home / "redis.url").write_text(redis_url + "\n")  # as `aetrain up` leaves it
    created = CliRunner().invoke(cli_app, ["keys", "create", "--tenant", "dave"], env=env)
    assert created.exit_code == 0, created.output
    assert store.api_keys.tenant_for_key(created.stdout.strip().splitlines()[-1]) == "dave"
    bad = CliRunner().invoke(cli_app, ["keys", "create", "--tenant", "Not OK"], env=env)
    assert bad.exit_code == 1 and "tenant" in bad.stderr
    (home / "redis.url").write_text(f"redis://127.0.0.1:{free_port()}/0\n")  # a stopped stack
    stale = CliRunner().invoke(cli_app, ["keys", "list"], env=env)
    assert stale.exit_code == 1 and "cannot reach Redis" in stale.stderr


@pytest.fixture
def served(auth_settings: Settings, store: JobStore) -> Iterator[str]:
    """The auth-on API on a real port, for the CLI's own HTTP client."""
    with serve(create_app(auth_settings)) as url:
        yield url


def test_the_cli_sends_aetrain_api_key(served: str, store: JobStore) -> None:
    _, key = store.api_keys.create("erin")
    args = ["list", "--url", served]
    anonymous = CliRunner().invoke(cli_app, args, env={"AETRAIN_API_KEY": None})
    assert anonymous.exit_code == 1
    assert "401" in anonymous.stderr and "AETRAIN_API_KEY" in anonymous.stderr
    keyed = CliRunner().invoke(cli_app, args, env={"AETRAIN_API_KEY": key})
    assert keyed.exit_code == 0, keyed.output

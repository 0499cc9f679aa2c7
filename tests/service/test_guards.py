"""What a request must pass before its body is read: the API key (auth on), the Host and
Origin (auth off), the JSON body cap; and /readyz, which tells an anonymous caller nothing."""

import json
import socket
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from shared.settings import Settings
from shared.store import JobStore
from tests.service.helpers import serve
from tests.specs import digits_spec

pytestmark = pytest.mark.timeout(60)


def raw_request(base_url: str, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send `head` and `body` on a plain socket (nothing more, whatever Content-Length says);
    return the status and the bytes of the answer. A server that waits for the rest of the
    body makes this time out, and the test fail."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        answer = b""
        while chunk := sock.recv(65536):  # the guard closes the connection after its answer
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer


@pytest.fixture
def live_api(auth_settings: Settings, store: JobStore) -> Iterator[str]:
    with serve(create_app(auth_settings)) as url:
        yield url


def test_an_anonymous_100_mb_body_gets_its_401_before_the_body_is_sent(live_api: str) -> None:
    head = (f"POST /v1/jobs HTTP/1.1\nHost: localhost\nContent-Type: application/json\n"
            f"Content-Length: {100 * 2**20}\n")  # fmt: skip
    status, answer = raw_request(live_api, head, b'{"kind": ')  # 9 of 100 MiB sent
    assert status == 401
    assert b"missing or invalid API key" in answer
    head = "POST /v1/datasets HTTP/1.1\nHost: localhost\nContent-Length: 268435456\n"
    assert raw_request(live_api, head, b"PK")[0] == 401  # an upload too


def test_a_malformed_body_without_a_key_is_401_not_422(
    auth_settings: Settings, store: JobStore
) -> None:
    with TestClient(create_app(auth_settings)) as api:
        response = api.post("/v1/jobs", content=b"{not json", headers={
            "Content-Type": "application/json"})  # fmt: skip
        assert response.status_code == 401


def test_a_json_body_past_the_cap_is_413_with_or_without_a_content_length(
    settings: Settings, store: JobStore
) -> None:
    small = settings.model_copy(update={"max_body_bytes": 4096})
    padding = {"tags": {f"t{i}": "x" * 50 for i in range(200)}}  # about 12 KB
    with serve(create_app(small)) as url, httpx.Client(base_url=url) as http:
        declared = http.post("/v1/jobs", json={**digits_spec(), **padding})
        assert declared.status_code == 413 and "4096" in declared.json()["detail"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
            yield json.dumps({**digits_spec(), **padding}).encode()

        streamed = http.post("/v1/jobs", content=chunks(), headers={
            "Content-Type": "application/json"})  # fmt: skip
        assert streamed.status_code == 413
        assert http.post("/v1/jobs", json=digits_spec()).status_code == 201  # under the cap
    assert store.queued_ids() and len(store.queued_ids()) == 1


@pytest.mark.parametrize(
    "headers",
    [
        {"Host": "rebind.evil.example"},
        {"Host": "rebind.evil.example:8000"},
        {"Host": "localhost", "Origin": "http://evil.example"},
        {"Host": "127.0.0.1:8000", "Origin": "null"},
        {"Host": "localhost", "Sec-Fetch-Site": "cross-site"},
    ],
)
def test_with_auth_off_a_foreign_host_or_site_is_refused(
    headers: dict[str, str], settings: Settings, store: JobStore
) -> None:
    local = settings.model_copy(update={"allowed_hosts": ""})
    with serve(create_app(local)) as url, httpx.Client(base_url=url) as http:
        response = http.get("/v1/jobs", headers=headers)
        assert response.status_code == 403, response.text
        assert "refused" in response.json()["detail"]
        # A cross-site simple POST (text/plain needs no CORS preflight) submits nothing.
        post = http.post("/v1/jobs", content=json.dumps(digits_spec()),
                         headers={**headers, "Content-Type": "text/plain"})  # fmt: skip
        assert post.status_code == 403
    assert store.queued_ids() == []


@pytest.mark.parametrize("host", ["localhost:8000", "127.0.0.1", "[::1]:8000", "LOCALHOST"])
def test_with_auth_off_loopback_hosts_and_same_origin_pages_are_served(
    host: str, settings: Settings, store: JobStore
) -> None:
    local = settings.model_copy(update={"allowed_hosts": ""})
    with serve(create_app(local)) as url, httpx.Client(base_url=url) as http:
        assert http.get("/v1/jobs", headers={"Host": host}).status_code == 200
        same_site = {"Host": host, "Origin": "http://localhost:8000",
                     "Sec-Fetch-Site": "same-origin"}  # fmt: skip
        assert http.get("/v1/jobs", headers=same_site).status_code == 200


def test_an_allowed_host_is_served_with_auth_off(settings: Settings, store: JobStore) -> None:
    named = settings.model_copy(update={"allowed_hosts": "aetrain.lab, gpu-box"})
    with serve(create_app(named)) as url, httpx.Client(base_url=url) as http:
        assert http.get("/v1/jobs", headers={"Host": "gpu-box:8000"}).status_code == 200
        assert http.get("/v1/jobs", headers={"Host": "other-box"}).status_code == 403


def test_readyz_says_only_ready_or_not_without_a_key(
    auth_settings: Settings, store: JobStore
) -> None:
    store.dispatchers.register("host-1-4242-abc", {"id": "host-1-4242-abc", "slots": 4,
                               "running": 2, "ray_address": "10.0.0.1:6379"}, ttl_s=30)  # fmt: skip
    before = store.redis.info("commandstats").get("cmdstat_scan", {}).get("calls", 0)
    with TestClient(create_app(auth_settings)) as api:
        anonymous = api.get("/readyz")
        assert anonymous.status_code == 200 and anonymous.json() == {"ready": True}
        bad_key = api.get("/readyz", headers={"Authorization": "Bearer aet_nope"})
        assert bad_key.json() == {"ready": True}
        _, key = store.api_keys.create("alice")
        detailed = api.get("/readyz", headers={"Authorization": f"Bearer {key}"}).json()
        assert detailed == {"ready": True, "dispatchers": 1, "slots": 4, "running_jobs": 2,
                            "redis_eviction_policy": "noeviction"}  # fmt: skip
        for answer in (anonymous.text, json.dumps(detailed)):
            assert "host-1" not in answer and "10.0.0.1" not in answer
    after = store.redis.info("commandstats").get("cmdstat_scan", {}).get("calls", 0)
    assert after == before  # no scan of the keyspace per probe


def test_readyz_hides_the_redis_error_text(tmp_path: object) -> None:
    from tests.conftest import free_port

    down = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", auth="on")
    with TestClient(create_app(down)) as api:
        response = api.get("/readyz")
        assert response.status_code == 503 and response.headers["Retry-After"] == "2"
        assert response.json() == {"ready": False, "reason": "the job store (Redis) is unreachable"}

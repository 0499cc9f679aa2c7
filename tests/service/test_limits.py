"""Limits a tenant cannot talk its way past: the priority its key allows, submissions per
minute; and Redis refusing writes (full, read-only) is a 503 to wait out, never a 500."""

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.cli import warn_if_exposed
from service.errors import redis_outage
from shared.settings import Settings
from shared.store import JobStore
from tests.specs import digits_spec

pytestmark = pytest.mark.timeout(60)


def with_priority(priority: int) -> dict[str, object]:
    return {**digits_spec(), "priority": priority}


def test_a_key_cannot_ask_for_more_priority_than_it_allows(
    settings: Settings, store: JobStore
) -> None:
    _, low = store.api_keys.create("alice", max_priority=3)
    _, high = store.api_keys.create("bob")  # 9, the most
    with TestClient(create_app(settings.model_copy(update={"auth": "on"}))) as api:
        as_low = {"Authorization": f"Bearer {low}"}
        refused = api.post("/v1/jobs", json=with_priority(5), headers=as_low)
        assert refused.status_code == 422
        assert refused.json()["detail"][0]["field"] == "priority"
        assert "above 3" in refused.json()["detail"][0]["msg"]
        assert store.queued_ids() == []
        ok = api.post("/v1/jobs", json=with_priority(3), headers=as_low)
        assert ok.status_code == 201
        as_high = {"Authorization": f"Bearer {high}"}
        ok = api.post("/v1/jobs", json=with_priority(9), headers=as_high)
        assert ok.status_code == 201


def test_past_its_submissions_per_minute_a_tenant_gets_429_and_a_retry_is_free(
    settings: Settings, store: JobStore
) -> None:
    limited = settings.model_copy(update={"max_submissions_per_minute": 5})
    with TestClient(create_app(limited)) as api:
        created = [api.post("/v1/jobs", json=digits_spec(), headers={"Idempotency-Key": f"k{i}"})
                   for i in range(5)]  # fmt: skip
        assert [r.status_code for r in created] == [201] * 5
        for r in created:  # cancelling frees the open-job limit, not the rate
            api.post(f"/v1/jobs/{r.json()['id']}/cancel")
        refused = api.post("/v1/jobs", json=digits_spec())
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert "this minute" in refused.json()["detail"]
        retry = api.post("/v1/jobs", json=digits_spec(), headers={"Idempotency-Key": "k0"})
        assert retry.status_code == 200 and retry.json()["id"] == created[0].json()["id"]
    assert len(store.redis.keys("aetrain:job:*")) == 5


@contextmanager
def redis_refusing_writes(store: JobStore, how: str) -> Iterator[None]:
    if how == "OOM":
        store.redis.config_set("maxmemory", "1")  # noeviction: every write is refused
    else:
        store.redis.execute_command("REPLICAOF", "127.0.0.1", "1")  # a replica is read-only
    try:
        yield
    finally:
        if how == "OOM":
            store.redis.config_set("maxmemory", "0")
        else:
            store.redis.execute_command("REPLICAOF", "NO", "ONE")


@pytest.mark.parametrize("how", ["OOM", "READONLY"])
def test_redis_refusing_writes_is_503_with_retry_after(
    how: str, client: TestClient, store: JobStore
) -> None:
    queued = client.post("/v1/jobs", json=digits_spec()).json()
    with redis_refusing_writes(store, how):
        submit = client.post("/v1/jobs", json=digits_spec())
        cancel = client.post(f"/v1/jobs/{queued['id']}/cancel")
        read = client.get(f"/v1/jobs/{queued['id']}")  # reads still work
    for refused in (submit, cancel):
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"] == "2"
        assert how in refused.json()["detail"]
    assert read.status_code == 200 and read.json()["state"] == "queued"
    assert client.post("/v1/jobs", json=digits_spec()).status_code == 201  # and back


def test_start_up_warns_when_redis_may_evict_jobs(
    store: JobStore, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from shared.store import warn_if_redis_evicts

    log = logging.getLogger("test.eviction")
    warn_if_redis_evicts(store, log)
    assert not caplog.records
    store.redis.config_set("maxmemory-policy", "allkeys-lru")
    try:
        warn_if_redis_evicts(store, log)
    finally:
        store.redis.config_set("maxmemory-policy", "noeviction")
    assert "allkeys-lru" in caplog.text and "noeviction" in caplog.text


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (redis.ResponseError("MISCONF Redis is configured to save RDB snapshots, but it's "
                             "currently unable to persist to disk"), "MISCONF"),  # fmt: skip
        (redis.exceptions.ExecAbortError(
            "Transaction discarded because of: OOM command not allowed when used memory > "
            "'maxmemory'."), "OOM"),  # fmt: skip
        (redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
         "READONLY"),  # fmt: skip
        (redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind"), None),
    ],
)
def test_which_redis_replies_are_an_outage(error: Exception, code: str | None) -> None:
    assert redis_outage(error) == code  # a WRONGTYPE is our bug: a 500, not a 503


def test_the_cli_warns_loudly_when_auth_is_off_on_a_reachable_address(
    capsys: pytest.CaptureFixture[str],
) -> None:
    warn_if_exposed("127.0.0.1")
    warn_if_exposed("localhost")
    assert capsys.readouterr().err == ""
    warn_if_exposed("0.0.0.0")
    warning = capsys.readouterr().err
    assert "WARNING" in warning and "auth OFF" in warning and "AETRAIN_AUTH=on" in warning

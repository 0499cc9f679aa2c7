"""GET /v1/jobs/{id}/logs on a real Redis, with log files written into storage as the workers
write them: the latest stage's newest run by default, 404s that name what is missing, a byte
cap per answer that a hostile `limit` cannot lift, follow streams that see a growing file and
always end, tenants kept apart; and a failed job's record keeping its traceback's tail."""

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from shared.jobs import JobRecord, JobState
from shared.settings import Settings
from shared.specs import parse_job_spec
from shared.storage import LocalStorage
from shared.store import JobStore
from tests.service.helpers import (
    append,
    end_stage,
    log_path,
    running_job,
    serve,
    start_stage,
    write_log,
)
from tests.specs import digits_spec

pytestmark = pytest.mark.timeout(60)

HUGE = 2**62  # the largest `limit` and `offset` the API takes
STACKED = {"kind": "stacked", "data": {"dataset": "digits"}, "training": {"epochs": 2},
           "layers": [{"units": 16}, {"units": 8}]}  # fmt: skip


def logs_url(job_id: str) -> str:
    return f"/v1/jobs/{job_id}/logs"


@pytest.fixture
def capped(settings: Settings, store: JobStore) -> Iterator[TestClient]:
    """The API with a 1 KiB cap on what one answer of /logs carries."""
    with TestClient(create_app(settings.model_copy(update={"stage_log_max_bytes": 1024}))) as c:
        yield c


# -- reading ----------------------------------------------------------------------------------
def test_a_stages_log_is_served_as_plain_text_from_storage(
    client: TestClient, store: JobStore, storage: LocalStorage
) -> None:
    claim = running_job(store)
    write_log(storage, claim.job.id, "train", claim.token, "epoch 0 loss 1.0\nepoch 1 loss 0.5\n")

    response = client.get(logs_url(claim.job.id))

    assert response.status_code == 200, response.text
    assert response.text == "epoch 0 loss 1.0\nepoch 1 loss 0.5\n"
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.headers["x-log-stage"] == "train"
    assert response.headers["x-log-attempt"] == str(claim.token)
    assert response.headers["x-log-size"] == response.headers["x-log-next-offset"] == "34"
    assert "x-log-truncated" not in response.headers
    named = client.get(logs_url(claim.job.id), params={"stage": "train"})
    assert named.text == response.text


def test_the_default_stage_is_the_one_that_started_last(
    client: TestClient, store: JobStore, storage: LocalStorage
) -> None:
    claim = running_job(store, STACKED)
    write_log(storage, claim.job.id, "layer1", claim.token, "layer one\n")
    assert client.get(logs_url(claim.job.id)).text == "layer one\n"
    end_stage(store, claim, "layer1")
    start_stage(store, claim, "layer2")
    write_log(storage, claim.job.id, "layer2", claim.token, "layer two\n")

    assert client.get(logs_url(claim.job.id)).headers["x-log-stage"] == "layer2"
    assert client.get(logs_url(claim.job.id)).text == "layer two\n"
    assert client.get(logs_url(claim.job.id), params={"stage": "layer1"}).text == "layer one\n"


def test_the_newest_run_of_a_stage_is_served_and_an_older_one_by_its_attempt(
    client: TestClient, store: JobStore, storage: LocalStorage
) -> None:
    claim = running_job(store)
    job_id, first = claim.job.id, claim.token
    write_log(storage, job_id, "train", first, "first run\n")
    write_log(storage, job_id, "train", first + 7, "after a takeover\n")
    write_log(storage, job_id, "layer1", first + 9, "not this stage's\n")

    newest = client.get(logs_url(job_id))
    older = client.get(logs_url(job_id), params={"attempt": first})
    missing = client.get(logs_url(job_id), params={"attempt": first + 1})

    assert (newest.text, newest.headers["x-log-attempt"]) == ("after a takeover\n", str(first + 7))
    assert older.text == "first run\n"
    assert missing.status_code == 404
    assert missing.json()["detail"] == (
        f"job {job_id!r}: stage 'train' has no log of attempt {first + 1} "
        f"(its attempts: {first}, {first + 7})"
    )


def test_a_missing_job_stage_or_log_is_a_404_that_names_it(
    client: TestClient, store: JobStore, storage: LocalStorage
) -> None:
    claim = running_job(store)
    queued, _ = store.submit(JobRecord.for_spec(parse_job_spec(digits_spec())))
    write_log(storage, claim.job.id, "train", claim.token, "x\n")

    unknown = client.get(logs_url("j-nope"))
    no_stage = client.get(logs_url(claim.job.id), params={"stage": "head"})
    not_yet = client.get(logs_url(queued.id))
    not_yet_followed = client.get(logs_url(queued.id), params={"follow": "true"})

    assert unknown.status_code == 404 and unknown.json()["detail"] == "job 'j-nope' not found"
    assert no_stage.status_code == 404
    assert no_stage.json()["detail"] == f"job {claim.job.id!r}: no stage 'head' (its stages: train)"
    assert not_yet.status_code == not_yet_followed.status_code == 404
    assert not_yet.json()["detail"] == (f"job {queued.id!r}: stage 'train' has no log yet (the "
                                        "job is queued, the stage pending)")  # fmt: skip


@pytest.mark.parametrize("stage", ["../../etc/passwd", "Train", "train/../x", "", "a" * 65, "9"])
def test_a_malformed_stage_name_is_a_422_on_stage(
    client: TestClient, store: JobStore, storage: LocalStorage, stage: str
) -> None:
    claim = running_job(store)
    write_log(storage, claim.job.id, "train", claim.token, "x\n")
    response = client.get(logs_url(claim.job.id), params={"stage": stage})
    assert response.status_code == 422, response.text
    assert [e["field"] for e in response.json()["detail"]] == ["stage"]


def test_a_log_that_is_a_symlink_is_never_served(
    client: TestClient, store: JobStore, storage: LocalStorage, tmp_path: Path
) -> None:
    claim = running_job(store)
    secret = tmp_path / "secret.txt"
    secret.write_text("not a log\n")
    path = log_path(storage, claim.job.id, "train", claim.token)
    path.parent.mkdir(parents=True)
    path.symlink_to(secret)
    response = client.get(logs_url(claim.job.id))
    assert response.status_code == 404 and "not a log" not in response.text


# -- the byte cap -----------------------------------------------------------------------------
def test_an_answer_carries_at_most_the_cap_and_says_where_the_next_page_starts(
    capped: TestClient, store: JobStore, storage: LocalStorage
) -> None:
    claim = running_job(store)
    text = "".join(f"line {i:04d} {'x' * 40}\n" for i in range(100))  # 5,100 bytes
    write_log(storage, claim.job.id, "train", claim.token, text)

    first = capped.get(logs_url(claim.job.id), params={"limit": HUGE})  # hostile: capped

    assert first.status_code == 200 and first.content == text.encode()[:1024]
    assert first.headers["x-log-next-offset"] == "1024" and first.headers["x-log-size"] == "5100"
    assert first.headers["x-log-truncated"] == (
        "4076 more bytes; at most 1024 bytes an answer (the cap is 1024, "
        "AETRAIN_STAGE_LOG_MAX_BYTES): ask again with offset=1024"
    )
    pages, response = [first.content], first
    while "x-log-truncated" in response.headers:
        offset = response.headers["x-log-next-offset"]
        response = capped.get(logs_url(claim.job.id), params={"offset": offset})
        assert len(response.content) <= 1024
        pages.append(response.content)
    assert b"".join(pages) == text.encode() and len(pages) == 5

    small = capped.get(logs_url(claim.job.id), params={"limit": 10, "offset": 5})
    assert small.content == text.encode()[5:15] and "at most 10 bytes" in small.headers[
        "x-log-truncated"]  # fmt: skip
    tail = capped.get(logs_url(claim.job.id), params={"offset": -51})
    assert tail.text == text[-51:] and tail.headers["x-log-offset"] == "5049"
    past_the_end = capped.get(logs_url(claim.job.id), params={"offset": HUGE})
    assert past_the_end.status_code == 200 and past_the_end.content == b""
    for hostile in ({"limit": HUGE + 1}, {"offset": 10**30}, {"offset": -(10**30)},
                    {"limit": 0}, {"attempt": -1}):  # fmt: skip
        assert capped.get(logs_url(claim.job.id), params=hostile).status_code == 422


def test_a_ten_gib_log_costs_one_page_to_read_or_to_follow(
    capped: TestClient, store: JobStore, storage: LocalStorage
) -> None:
    claim = running_job(store)
    path = write_log(storage, claim.job.id, "train", claim.token, b"")
    with path.open("wb") as file:
        file.truncate(10 * 2**30)  # sparse: no disk, but 10 GiB to whoever reads it whole

    read = capped.get(logs_url(claim.job.id), params={"limit": HUGE})
    followed = capped.get(logs_url(claim.job.id), params={"follow": "true", "limit": HUGE})
    last = capped.get(logs_url(claim.job.id), params={"offset": -(2**40)})  # the start, then

    assert read.status_code == followed.status_code == 200
    assert len(read.content) == len(followed.content) == 1024  # the stage still runs
    assert read.headers["x-log-size"] == str(10 * 2**30)
    assert last.headers["x-log-offset"] == "0" and len(last.content) == 1024


# -- tenants ----------------------------------------------------------------------------------
def test_another_tenants_log_is_a_404_exactly_like_an_unknown_job(
    auth_settings: Settings, store: JobStore, storage: LocalStorage
) -> None:
    _, alice = store.api_keys.create("alice")
    _, bob = store.api_keys.create("bob")
    claim = running_job(store, tenant="alice")
    write_log(storage, claim.job.id, "train", claim.token, "alice's secrets\n")

    with TestClient(create_app(auth_settings)) as api:

        def get(key: str | None, job_id: str, **params: str) -> httpx.Response:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            return api.get(logs_url(job_id), params=params, headers=headers)

        own = get(alice, claim.job.id)
        foreign = get(bob, claim.job.id)
        foreign_followed = get(bob, claim.job.id, follow="true")
        foreign_stage = get(bob, claim.job.id, stage="train")
        unknown = get(bob, "j00000000000000000000")
        anonymous = get(None, claim.job.id)

    assert own.status_code == 200 and own.text == "alice's secrets\n"
    for response in (foreign, foreign_followed, foreign_stage):
        assert response.status_code == 404 and "secrets" not in response.text
        assert response.json() == {"detail": f"job {claim.job.id!r} not found"}
    assert unknown.json() == {"detail": "job 'j00000000000000000000' not found"}
    assert anonymous.status_code == 401


# -- follow -----------------------------------------------------------------------------------
def read_until(chunks: Iterator[bytes], wanted: bytes, timeout_s: float = 10.0) -> bytes:
    """Bytes from the stream until they end with `wanted`."""
    got = b""
    deadline = time.monotonic() + timeout_s
    while not got.endswith(wanted):
        assert time.monotonic() < deadline, f"only {got!r} within {timeout_s} s"
        got += next(chunks)
    return got


def test_follow_streams_lines_as_they_are_written_until_the_stage_ends(
    settings: Settings, store: JobStore, storage: LocalStorage
) -> None:
    claim = running_job(store)
    path = write_log(storage, claim.job.id, "train", claim.token, "start\n")

    with serve(create_app(settings)) as url, httpx.Client(base_url=url, timeout=10) as http:
        params = {"follow": "true"}
        with http.stream("GET", logs_url(claim.job.id), params=params) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/plain; charset=utf-8"
            chunks = response.iter_bytes()
            assert read_until(chunks, b"start\n") == b"start\n"
            for epoch in range(3):  # each line arrives while the stage runs on
                line = f"epoch {epoch}\n".encode()
                append(path, line.decode())
                assert read_until(chunks, line) == line
            append(path, "ended\n")
            end_stage(store, claim, "train")
            ended_at = time.monotonic()
            rest = b"".join(chunks)  # the stream closes by itself
            assert time.monotonic() - ended_at < 5
    assert rest == b"ended\n"


def test_follow_ends_at_its_time_limit_while_the_stage_runs_on(
    settings: Settings, store: JobStore, storage: LocalStorage
) -> None:
    claim = running_job(store)
    write_log(storage, claim.job.id, "train", claim.token, "quiet\n")
    limited = settings.model_copy(update={"stage_log_follow_max_s": 1.0})
    with TestClient(create_app(limited)) as api:
        started = time.monotonic()
        response = api.get(logs_url(claim.job.id), params={"follow": "true"})
        took = time.monotonic() - started
    assert response.status_code == 200 and response.text == "quiet\n"
    assert 1.0 <= took < 5


def test_follow_of_a_finished_job_sends_the_log_and_ends(
    client: TestClient, store: JobStore, storage: LocalStorage
) -> None:
    claim = running_job(store)
    write_log(storage, claim.job.id, "train", claim.token, "boom\n")
    store.finish(claim, JobState.FAILED, error="boom")
    started = time.monotonic()
    response = client.get(logs_url(claim.job.id), params={"follow": "true", "offset": 1})
    assert response.text == "oom\n" and time.monotonic() - started < 3


def test_follow_ends_when_a_newer_run_of_the_stage_begins(
    settings: Settings, store: JobStore, storage: LocalStorage
) -> None:
    claim = running_job(store)
    write_log(storage, claim.job.id, "train", claim.token, "first run\n")

    def take_over() -> None:
        time.sleep(0.8)
        write_log(storage, claim.job.id, "train", claim.token + 1, "second run\n")
        store.update(claim.job.id, claim.token, lambda j: j)  # a change: followers look again

    with TestClient(create_app(settings)) as api:
        thread = threading.Thread(target=take_over)
        thread.start()
        started = time.monotonic()
        response = api.get(logs_url(claim.job.id), params={"follow": "true"})
        thread.join()
    assert response.text == "first run\n" and time.monotonic() - started < 8
    assert response.headers["x-log-attempt"] == str(claim.token)


def test_a_follow_takes_one_of_the_tenants_event_streams(
    settings: Settings, store: JobStore, storage: LocalStorage
) -> None:
    claim = running_job(store)
    write_log(storage, claim.job.id, "train", claim.token, "x\n")
    one_stream = settings.model_copy(update={"max_event_streams": 1})
    with serve(create_app(one_stream)) as url, httpx.Client(base_url=url, timeout=10) as http:
        params = {"follow": "true"}
        with http.stream("GET", logs_url(claim.job.id), params=params) as first:
            assert first.status_code == 200
            second = http.get(logs_url(claim.job.id), params=params)
            assert second.status_code == 429 and second.headers["retry-after"]
            assert http.get(logs_url(claim.job.id)).status_code == 200  # a plain read is free
        deadline = time.monotonic() + 10  # the closed stream's slot is released
        while True:
            with http.stream("GET", logs_url(claim.job.id), params=params) as again:
                if again.status_code == 200:
                    break
            assert time.monotonic() < deadline, "the slot of a closed follow was kept"
            time.sleep(0.1)


# -- a failed job's record keeps the tail of its traceback -------------------------------------
def test_a_failed_jobs_record_keeps_the_last_lines_of_its_stage_log(
    client: TestClient, store: JobStore, storage: LocalStorage
) -> None:
    from workers.lease import LeaseKeeper
    from workers.runner import ERROR_TAIL_BYTES, StageRun, file_tail, keep_error_tail

    claim = running_job(store)
    frame = '  File "train_loop.py", line {}, in step\n    x = f(x)\n'
    traceback = "".join(frame.format(i) for i in range(500)) + "ValueError: boom\n"
    path = write_log(storage, claim.job.id, "train", claim.token, traceback)
    run = StageRun(claim, "train", {"log_path": str(path)})
    keep_error_tail(store, LeaseKeeper(store, claim.job.id, claim.token, 30.0), run,
                    file_tail(str(path)))  # fmt: skip
    store.finish(claim, JobState.FAILED, error="stage train failed: ValueError: boom")

    record = client.get(f"/v1/jobs/{claim.job.id}").json()

    tail = record["error_tail"]
    assert record["state"] == "failed" and tail.endswith("ValueError: boom")
    assert len(tail.splitlines()) == 20 and tail.splitlines()[-2] == "    x = f(x)"
    assert len(tail.encode()) <= ERROR_TAIL_BYTES


def test_an_error_tail_is_capped_in_bytes_whatever_the_log_holds(storage: LocalStorage) -> None:
    from workers.runner import ERROR_TAIL_BYTES, file_tail, last_lines

    path = storage.root / "huge.log"
    path.parent.mkdir(parents=True)
    with path.open("w") as file:  # a 5 MB log of 1 MB lines, the last with a multibyte tail
        for _ in range(5):
            file.write("é" * 500_000 + "\n")
    tail = last_lines(file_tail(str(path)))
    assert 0 < len(tail.encode()) <= ERROR_TAIL_BYTES and set(tail) == {"é"}
    assert last_lines("") == "" and file_tail(str(storage.root / "none.log")) == ""

"""aetrain.Client against the real API (TestClient or a live uvicorn) and a real Redis: every
method, the error classes, wait's callbacks and outages, events, downloads and the encoder."""

import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import uvicorn
import yaml
from fastapi.testclient import TestClient

from aetrain import (
    ApiError,
    Client,
    Conflict,
    ConnectionFailed,
    Event,
    Job,
    JobTimeout,
    NotFound,
    RateLimited,
    Unauthorized,
    ValidationFailed,
)
from aetrain.client import parse_events
from service.app import create_app
from shared.jobs import JobRecord, JobState, StageState
from shared.settings import Settings
from shared.specs import parse_job_spec
from shared.storage import LocalStorage
from shared.store import JobStore
from tests.conftest import free_port
from tests.service.helpers import (
    append,
    artifact_bytes,
    end_stage,
    running_job,
    serve,
    succeeded_job,
    write_log,
)
from tests.specs import digits_spec

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def api(client: TestClient) -> Client:
    """The client under test, sending through the app's TestClient (no port, no thread)."""
    return Client(http=client)


def run_job(store: JobStore, job_id: str, epochs: int = 3, pause_s: float = 0.25) -> None:
    """What a dispatcher does to a job, slowly enough for a poller to see each step."""
    time.sleep(pause_s)
    claim = store.claim("test-runner", 30.0, block_ms=100)
    assert claim is not None and claim.job.id == job_id
    store.update(job_id, claim.token, lambda j: j.with_stage("train", StageState.RUNNING))
    for epoch in range(epochs):
        time.sleep(pause_s)
        store.record_progress(job_id, claim.token, "train", epoch, {"val_mse": 1 / (epoch + 1)})
    store.update(job_id, claim.token, lambda j: j.with_stage("train", StageState.SUCCEEDED))
    time.sleep(pause_s)
    store.finish(claim, JobState.SUCCEEDED, result={"metrics": {"val_mse": 0.3}, "artifacts": []})


def in_thread(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


# -- submit, read, list, cancel, delete ----------------------------------------------------------
def test_submit_takes_a_dict_a_yaml_file_a_json_file_or_a_spec_model(
    api: Client, tmp_path: Path
) -> None:
    spec = digits_spec()
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    jobs = [
        api.submit(spec),
        api.submit(tmp_path / "spec.yaml"),
        api.submit(str(tmp_path / "spec.json")),
        api.submit(parse_job_spec(spec)),
    ]
    assert len({job["id"] for job in jobs}) == 4
    assert all(job["state"] == "queued" and job["name"] == "digits-dense" for job in jobs)
    assert all(job["spec"] == jobs[0]["spec"] for job in jobs)  # one spec, four spellings
    assert api.get(jobs[0]["id"]) == jobs[0]


def test_a_retried_submit_with_its_idempotency_key_is_one_job(api: Client) -> None:
    first = api.submit(digits_spec(), idempotency_key="nightly-1")
    again = api.submit(digits_spec(), idempotency_key="nightly-1")
    assert again["id"] == first["id"]
    with pytest.raises(Conflict, match="Idempotency-Key"):
        api.submit(digits_spec(epochs=4), idempotency_key="nightly-1")


def test_list_pages_newest_first_and_jobs_walks_every_page(api: Client) -> None:
    ids = [api.submit(digits_spec())["id"] for _ in range(3)]
    page = api.list(limit=2)
    assert [job["id"] for job in page["items"]] == ids[:0:-1] and page["next_cursor"]
    rest = api.list(limit=2, cursor=page["next_cursor"])
    assert [job["id"] for job in rest["items"]] == ids[:1]
    assert [job["id"] for job in api.jobs()] == ids[::-1]
    cancelled = api.cancel(ids[1])
    assert cancelled["state"] == "cancelled"
    assert [job["id"] for job in api.list(state="cancelled")["items"]] == [ids[1]]
    api.delete(ids[1])
    with pytest.raises(NotFound):
        api.get(ids[1])


# -- errors ------------------------------------------------------------------------------------
def test_each_kind_of_refusal_is_its_own_error_with_the_apis_words(
    api: Client, settings: Settings, store: JobStore
) -> None:
    with pytest.raises(NotFound) as missing:
        api.get("job-that-is-not-there")
    assert missing.value.status == 404 and "not found" in str(missing.value)
    assert str(missing.value).startswith("HTTP 404: ")

    bad = digits_spec(epochs=0)
    with pytest.raises(ValidationFailed) as invalid:
        api.submit(bad)
    assert [e["field"] for e in invalid.value.errors] == ["training.epochs"]
    assert "training.epochs" in str(invalid.value)

    queued = api.submit(digits_spec())
    with pytest.raises(Conflict, match="queued"):
        api.result(queued["id"])
    api.cancel(queued["id"])
    with pytest.raises(Conflict):
        api.cancel(queued["id"])

    with TestClient(create_app(settings.model_copy(update={"auth": "on"}))) as http:
        with pytest.raises(Unauthorized, match="AETRAIN_API_KEY"):
            Client(http=http, api_key="aet_not_a_key").list()
        _, key = store.api_keys.create("erin")
        assert Client(http=http, api_key=key).list()["items"] == []


def test_past_the_submissions_per_minute_is_rate_limited_with_when_to_retry(
    settings: Settings, store: JobStore
) -> None:
    limited = settings.model_copy(update={"max_submissions_per_minute": 1})
    with TestClient(create_app(limited)) as http:
        api = Client(http=http)
        api.submit(digits_spec())
        with pytest.raises(RateLimited) as rate:  # by the third, even if the minute turned
            for _ in range(2):
                api.submit(digits_spec())
    assert rate.value.status == 429 and "this minute" in str(rate.value)
    assert rate.value.retry_after_s is not None and 0 < rate.value.retry_after_s <= 60


def test_an_api_that_is_not_there_is_connection_failed(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, timeout=2) as api, pytest.raises(ConnectionFailed) as down:
        api.list()
    assert down.value.status is None
    assert url in str(down.value) and "aetrain up" in str(down.value)
    with Client(url, timeout=2) as api, pytest.raises(ConnectionFailed):
        api.download("job", "result.json", tmp_path)
    assert list(tmp_path.iterdir()) == []  # no half file


# -- wait and events ---------------------------------------------------------------------------
def test_wait_calls_back_on_each_change_and_returns_the_finished_record(
    api: Client, store: JobStore
) -> None:
    job_id = api.submit(digits_spec())["id"]
    seen: list[Job] = []
    runner = in_thread(lambda: run_job(store, job_id))
    final = api.wait(job_id, callback=seen.append, timeout=30, poll_s=0.05)
    runner.join()
    assert final["state"] == "succeeded" and final == seen[-1]
    states = [job["state"] for job in seen]
    assert states[0] == "queued" and "running" in states
    epochs = [job["epoch"] for job in seen if job["epoch"] is not None]
    assert epochs == sorted(epochs) and epochs[-1] == 2 and len(set(epochs)) >= 2
    assert all(a != b for a, b in zip(seen, seen[1:], strict=False))  # only changes
    assert api.result(job_id)["metrics"] == {"val_mse": 0.3}


def test_wait_gives_up_after_its_timeout(api: Client) -> None:
    job_id = api.submit(digits_spec())["id"]
    started = time.monotonic()
    with pytest.raises(JobTimeout, match="still queued") as timeout:
        api.wait(job_id, timeout=0.5, poll_s=0.1)
    assert 0.5 <= time.monotonic() - started < 5
    assert timeout.value.job_id == job_id and timeout.value.state == "queued"


def test_wait_rides_out_an_api_that_is_down_and_then_comes_up(
    settings: Settings, store: JobStore
) -> None:
    job, _ = store.submit(JobRecord.for_spec(parse_job_spec(digits_spec())))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), port=port, log_level="warning"))

    def start_late() -> None:
        time.sleep(1.0)
        server.run()

    thread = in_thread(start_late)
    retried: list[ApiError] = []
    try:
        with Client(f"http://127.0.0.1:{port}", timeout=2) as api:
            store.request_cancel(job.id)  # ends it; the client cannot know until it is up
            final = api.wait(job.id, on_retry=retried.append, timeout=30)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert final["state"] == "cancelled"
    assert retried and all(isinstance(e, ConnectionFailed) for e in retried)


def test_events_stream_states_and_epochs_and_resume_after_the_last_seen(
    api: Client, store: JobStore
) -> None:
    job_id = api.submit(digits_spec())["id"]
    runner = in_thread(lambda: run_job(store, job_id, pause_s=0.1))
    events = list(api.events(job_id))
    runner.join()
    kinds = [event.kind for event in events]
    assert kinds[0] == "state" and events[0].data["state"] == "queued"
    assert kinds[-1] == "end" and events[-1].data == {"state": "succeeded"}
    epochs = [event for event in events if event.kind == "epoch"]
    assert [e.data["epoch"] for e in epochs] == [0, 1, 2] and all(e.id for e in epochs)
    resumed = [e for e in api.events(job_id, last_event_id=epochs[0].id) if e.kind == "epoch"]
    assert [e.data["epoch"] for e in resumed] == [1, 2]
    with pytest.raises(NotFound):
        next(api.events("job-that-is-not-there"))


def test_parse_events_follows_the_event_stream_format() -> None:
    lines = [": keepalive", "", "event: epoch", "id: 1-0", 'data: {"a":', "data: 1}", "",
             "data: [2]", "", 'event: end', 'data:{"state": "failed"}', ""]  # fmt: skip
    assert list(parse_events(iter(lines))) == [
        Event("epoch", {"a": 1}, "1-0"),
        Event("message", {"data": [2]}, None),
        Event("end", {"state": "failed"}, None),
    ]


# -- files -------------------------------------------------------------------------------------
def test_download_streams_an_artifact_to_a_file_and_leaves_nothing_on_a_404(
    api: Client, store: JobStore, storage: LocalStorage, tmp_path: Path
) -> None:
    job = succeeded_job(store, storage)
    out = tmp_path / "out"
    out.mkdir()
    path = api.download(job.id, "result.json", out)
    assert path == out / "result.json"
    assert path.read_bytes() == artifact_bytes(job.id, "result.json")
    named = api.download(job.id, "model.json", out / "model-copy.json")
    assert named.read_bytes() == artifact_bytes(job.id, "model.json")
    with pytest.raises(NotFound):
        api.download(job.id, "../../etc/passwd", out / "stolen")
    assert sorted(p.name for p in out.iterdir()) == ["model-copy.json", "result.json"]


def test_a_nested_artifact_downloads_into_its_folders_and_a_refused_one_leaves_none(
    api: Client, store: JobStore, storage: LocalStorage, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    nested = "tensorboard/train/events.out.tfevents.1.aetrain"
    job = succeeded_job(store, storage, artifacts=["result.json", nested])
    monkeypatch.chdir(tmp_path)
    path = api.download(job.id, nested)
    assert path == Path(nested)
    assert (tmp_path / nested).read_bytes() == artifact_bytes(job.id, nested)
    with pytest.raises(NotFound):
        api.download(job.id, "missing/deep/events.bin")
    assert not (tmp_path / "missing").exists()
    # Into a folder: the file under its own name.
    flat = api.download(job.id, nested, tmp_path)
    assert flat == tmp_path / "events.out.tfevents.1.aetrain" and flat.is_file()


def test_load_encoder_returns_the_jobs_torchscript_module_ready_to_use(
    api: Client, store: JobStore, storage: LocalStorage
) -> None:
    job = succeeded_job(store, storage)
    assert job.result is not None
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Dropout(0.5), torch.nn.ReLU())
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(encoder), buffer)  # what the workers leave as encoder.pt
    (storage.root / job.result["folder"] / "encoder.pt").write_bytes(buffer.getvalue())

    loaded = api.load_encoder(job.id)
    assert isinstance(loaded, torch.nn.Module) and not loaded.training  # dropout off
    x = torch.rand(5, 64)
    encoder.eval()
    torch.testing.assert_close(loaded(x), encoder(x))
    with pytest.raises(NotFound):
        api.load_encoder("job-that-is-not-there")


def test_import_aetrain_loads_neither_torch_nor_the_server() -> None:
    code = ("import sys, aetrain; print(sorted(m for m in ('torch', 'fastapi', 'ray', 'redis', "
            "'numpy', 'shared', 'service') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- datasets ----------------------------------------------------------------------------------
def npz_file(path: Path, rows: int = 40) -> Path:
    rng = np.random.default_rng(rows)
    np.savez(path, x=rng.random((rows, 6), dtype=np.float32), y=rng.integers(0, 3, rows))
    return path


def test_upload_raw_or_multipart_from_a_path_bytes_or_a_file(api: Client, tmp_path: Path) -> None:
    path = npz_file(tmp_path / "d.npz")
    raw = api.upload(path, name="raw")
    assert raw["shape"] == [40, 6] and raw["name"] == "raw"
    form = api.upload(path, name="form", multipart=True)
    assert form["id"] == raw["id"]  # the same bytes, whichever way they came
    with open(path, "rb") as f:
        assert api.upload(f, multipart=True)["id"] == raw["id"]
    other = api.upload(npz_file(tmp_path / "e.npz", rows=50).read_bytes())
    assert other["shape"] == [50, 6]
    listing = api.datasets()
    assert [d["id"] for d in listing["items"]] == [other["id"], raw["id"]]
    assert "digits" in listing["builtin"]
    assert api.get_dataset(raw["id"]) == raw
    with pytest.raises(ValidationFailed) as refused:
        api.upload(b"not numpy at all" * 4, multipart=True)
    assert refused.value.errors[0]["field"] == "file"
    api.delete_dataset(other["id"])
    with pytest.raises(NotFound):
        api.get_dataset(other["id"])


# -- logs --------------------------------------------------------------------------------------
def test_logs_reads_a_whole_log_page_by_page_and_splits_no_character(
    settings: Settings, store: JobStore, storage: LocalStorage
) -> None:
    claim = running_job(store)
    text = "".join(f"epoch {i} — loss ≈ {1 / (i + 1):.4f}\n" for i in range(200))  # multibyte
    write_log(storage, claim.job.id, "train", claim.token, text)
    capped = settings.model_copy(update={"stage_log_max_bytes": 1024})
    with TestClient(create_app(capped)) as http:
        api = Client(http=http)
        assert len(text.encode()) > 5 * 1024  # pages, cut inside characters
        assert api.logs(claim.job.id) == text
        assert api.logs(claim.job.id, stage="train") == text
        with pytest.raises(NotFound, match="no stage 'head'"):
            api.logs(claim.job.id, stage="head")
        with pytest.raises(ValidationFailed):
            api.logs(claim.job.id, stage="../train")


def test_logs_follow_yields_lines_as_written_past_the_cap_and_across_a_takeover(
    settings: Settings, store: JobStore, storage: LocalStorage
) -> None:
    claim = running_job(store)
    first = "".join(f"first run, line {i}\n" for i in range(100))  # 2 KiB: past the cap
    path = write_log(storage, claim.job.id, "train", claim.token, first)
    capped = settings.model_copy(update={"stage_log_max_bytes": 1024})
    seen_while_running: list[str] = []

    def later() -> None:
        time.sleep(1.0)
        append(path, "first run, last line\n")
        time.sleep(0.5)
        newer = write_log(storage, claim.job.id, "train", claim.token + 1, "second run\n")
        store.update(claim.job.id, claim.token, lambda j: j)  # the takeover's record change
        time.sleep(0.5)
        append(newer, "second run, done\n")
        end_stage(store, claim, "train")

    with serve(create_app(capped)) as url, Client(url, timeout=10) as api:
        thread = in_thread(later)
        chunks = []
        for chunk in api.logs(claim.job.id, follow=True):
            chunks.append(chunk)
            if thread.is_alive():
                seen_while_running.append(chunk)
        thread.join()
    assert "".join(chunks) == first + "first run, last line\nsecond run\nsecond run, done\n"
    assert "".join(seen_while_running).startswith(first)  # streamed, not read at the end


def test_logs_follow_of_a_finished_job_returns_its_log_at_once(
    api: Client, store: JobStore, storage: LocalStorage
) -> None:
    claim = running_job(store)
    write_log(storage, claim.job.id, "train", claim.token, "Traceback ...\nValueError: x\n")
    store.finish(claim, JobState.FAILED, error="ValueError: x", error_tail="ValueError: x")
    started = time.monotonic()
    assert "".join(api.logs(claim.job.id, follow=True)) == "Traceback ...\nValueError: x\n"
    assert time.monotonic() - started < 5
    assert api.get(claim.job.id)["error_tail"] == "ValueError: x"


# -- the CLI is built on it ----------------------------------------------------------------------
@pytest.fixture
def served(settings: Settings, store: JobStore) -> Iterator[str]:
    with serve(create_app(settings)) as url:
        yield url


def test_cli_submit_wait_follows_the_job_to_its_end_through_the_client(
    served: str, store: JobStore, storage: LocalStorage, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from service.cli import app as cli_app

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(digits_spec()))
    runner = threading.Thread(target=lambda: run_job(store, wait_for_queued(store)))
    runner.start()
    result = CliRunner().invoke(cli_app, ["submit", str(spec_file), "--wait", "--url", served])
    runner.join()
    assert result.exit_code == 0, result.output
    job_id = result.stdout.split()[0]
    assert job_id.startswith("j") and "succeeded" in result.stdout

    job = succeeded_job(store, storage)
    pulled = CliRunner().invoke(
        cli_app, ["pull", job.id, "-o", str(tmp_path / "enc.pt"), "--url", served]
    )
    assert pulled.exit_code == 0, pulled.output
    assert (tmp_path / "enc.pt").read_bytes() == artifact_bytes(job.id, "encoder.pt")
    assert f"wrote {tmp_path / 'enc.pt'}" in pulled.stdout
    missing = CliRunner().invoke(cli_app, ["status", "job-nope", "--url", served])
    assert missing.exit_code == 1 and "HTTP 404" in missing.stderr


def wait_for_queued(store: JobStore, timeout_s: float = 20) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        items, _ = store.list_jobs("default", JobState.QUEUED, None, 1)
        if items:
            return items[0].id
        time.sleep(0.05)
    raise AssertionError("no job was submitted")

"""The `aetrain` client commands against a live API (uvicorn) and a real Redis: `--json` on every
read command, datasets, artifacts, logs (and following one), version, shell completion."""

import json
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner, Result

from aetrain import Client
from service.app import create_app
from service.cli import app as cli_app
from shared.jobs import JobRecord, JobState
from shared.settings import Settings
from shared.specs import parse_job_spec
from shared.storage import LocalStorage
from shared.store import JobStore
from tests.service.helpers import (
    ARTIFACTS,
    append,
    artifact_bytes,
    end_stage,
    running_job,
    serve,
    start_stage,
    succeeded_job,
    write_log,
)
from tests.specs import digits_spec

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def served(settings: Settings, store: JobStore) -> Iterator[str]:
    with serve(create_app(settings)) as url:
        yield url


def aetrain(url: str | None, *args: str) -> Result:
    """`aetrain ARGS --url URL`, as a user runs it (no API key: auth is off here)."""
    tail = ["--url", url] if url else []
    return CliRunner().invoke(cli_app, [*args, *tail], env={"AETRAIN_API_KEY": None})


def json_of(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def npz_file(path: Path, rows: int = 30) -> Path:
    rng = np.random.default_rng(rows)
    np.savez(path, x=rng.random((rows, 4), dtype=np.float32), y=rng.integers(0, 2, rows))
    return path


# -- --json -------------------------------------------------------------------------------------
def test_every_read_command_prints_the_apis_answer_as_json_with_json(
    served: str, store: JobStore, storage: LocalStorage, tmp_path: Path
) -> None:
    done = succeeded_job(store, storage)
    queued, _ = store.submit(JobRecord.for_spec(parse_job_spec(digits_spec())))
    uploaded = json_of(aetrain(served, "datasets", "upload", str(npz_file(tmp_path / "d.npz")),
                               "--name", "tiny", "--json"))  # fmt: skip
    with Client(served) as client:
        assert json_of(aetrain(served, "status", done.id, "--json")) == client.get(done.id)
        assert json_of(aetrain(served, "list", "--json")) == client.list()
        assert json_of(aetrain(served, "result", done.id, "--json")) == client.result(done.id)
        assert json_of(aetrain(served, "datasets", "list", "--json")) == client.datasets()
        assert json_of(aetrain(served, "artifacts", done.id, "--json")) == ARTIFACTS
        assert uploaded == client.get_dataset(uploaded["id"])
    listed = json_of(aetrain(served, "list", "--json"))["items"]
    assert [job["id"] for job in listed] == [queued.id, done.id]
    assert json_of(aetrain(None, "version", "--json")) == {"version": "0.1.0"}


def test_keys_list_prints_json_with_json(auth_settings: Settings, store: JobStore) -> None:
    key_id, _ = store.api_keys.create("alice")
    env = {"AETRAIN_REDIS_URL": auth_settings.redis_url, "AETRAIN_API_KEY": None}
    result = CliRunner().invoke(cli_app, ["keys", "list", "--json"], env=env)
    infos = json_of(result)
    assert [(info["key_id"], info["tenant"]) for info in infos] == [(key_id, "alice")]


# -- datasets, artifacts, version ---------------------------------------------------------------
def test_datasets_upload_prints_the_id_and_list_shows_it_with_the_builtins(
    served: str, tmp_path: Path
) -> None:
    uploaded = aetrain(served, "datasets", "upload", str(npz_file(tmp_path / "d.npz")),
                       "--name", "tiny")  # fmt: skip
    assert uploaded.exit_code == 0, uploaded.output
    dataset_id = uploaded.stdout.strip()
    assert dataset_id.startswith("ds-")
    listed = aetrain(served, "datasets", "list")
    assert listed.exit_code == 0 and dataset_id in listed.stdout and "tiny" in listed.stdout
    assert "built in: " in listed.stdout and "digits" in listed.stdout
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not numpy" * 10)
    refused = aetrain(served, "datasets", "upload", str(bad))
    assert refused.exit_code == 1 and "422" in refused.stderr
    missing = aetrain(served, "datasets", "upload", str(tmp_path / "none.npz"))
    assert missing.exit_code == 1 and "cannot read" in missing.stderr


def test_artifacts_lists_a_jobs_files_and_downloads_one(
    served: str,
    store: JobStore,
    storage: LocalStorage,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job = succeeded_job(store, storage)
    listed = aetrain(served, "artifacts", job.id)
    assert listed.exit_code == 0 and listed.stdout.split() == ARTIFACTS

    named = aetrain(served, "artifacts", job.id, "model.json", "-o", str(tmp_path / "m.json"))
    assert named.exit_code == 0, named.output
    assert (tmp_path / "m.json").read_bytes() == artifact_bytes(job.id, "model.json")
    monkeypatch.chdir(tmp_path)
    here = aetrain(served, "artifacts", job.id, "result.json")
    assert here.exit_code == 0 and (tmp_path / "result.json").is_file()
    assert "wrote result.json" in here.stdout

    unknown = aetrain(served, "artifacts", job.id, "passwd")
    assert unknown.exit_code == 1 and "404" in unknown.stderr
    assert not (tmp_path / "passwd").exists()
    queued, _ = store.submit(JobRecord.for_spec(parse_job_spec(digits_spec())))
    not_done = aetrain(served, "artifacts", queued.id)
    assert not_done.exit_code == 1 and "409" in not_done.stderr


def test_version_prints_the_installed_version() -> None:
    result = aetrain(None, "version")
    assert result.exit_code == 0 and result.stdout == "aetrain 0.1.0\n"


def test_the_installed_command_completes_commands_and_options_in_bash() -> None:
    command = str(Path(sys.executable).parent / "aetrain")
    # The shell is the one it runs under (typer looks up its parent processes, and takes no
    # shell argument): a suite run with no bash above it got "Shell  not supported."
    shown = subprocess.run(["bash", "-c", f"{shlex.quote(command)} --show-completion; exit $?"],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert shown.returncode == 0, (shown.stdout, shown.stderr)
    assert "_AETRAIN_COMPLETE=complete_bash" in shown.stdout

    def complete(words: str) -> list[str]:
        env = {"_AETRAIN_COMPLETE": "complete_bash", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split()) - 1), "PATH": ""}  # fmt: skip
        done = subprocess.run([command], env=env, capture_output=True, text=True, check=True)
        return done.stdout.split()

    assert complete("aetrain dat") == ["datasets"]
    assert complete("aetrain logs --st") == ["--stage"]


# -- logs ---------------------------------------------------------------------------------------
def test_logs_prints_a_stages_log_and_a_missing_stage_fails_naming_it(
    served: str, store: JobStore, storage: LocalStorage
) -> None:
    claim = running_job(store)
    write_log(storage, claim.job.id, "train", claim.token, "[red]not markup[/red]\nepoch 0\n")
    printed = aetrain(served, "logs", claim.job.id)
    assert printed.exit_code == 0 and printed.stdout == "[red]not markup[/red]\nepoch 0\n"
    assert aetrain(served, "logs", claim.job.id, "--stage", "train").stdout == printed.stdout
    missing = aetrain(served, "logs", claim.job.id, "--stage", "head")
    assert missing.exit_code == 1 and "no stage 'head'" in missing.stderr
    unknown = aetrain(served, "logs", "j-nope", "-f")
    assert unknown.exit_code == 1 and "HTTP 404" in unknown.stderr


def test_logs_follow_waits_for_a_queued_job_and_prints_its_stage_to_the_end(
    served: str, store: JobStore, storage: LocalStorage
) -> None:
    job, _ = store.submit(JobRecord.for_spec(parse_job_spec(digits_spec())))

    def run() -> None:
        time.sleep(1.5)  # the CLI waits for the stage meanwhile
        claim = store.claim("test-runner", lease_ttl_s=30.0, block_ms=100)
        assert claim is not None and claim.job.id == job.id
        start_stage(store, claim, "train")
        path = write_log(storage, job.id, "train", claim.token, "epoch 0\n")
        for epoch in range(1, 3):
            time.sleep(0.3)
            append(path, f"epoch {epoch}\n")
        end_stage(store, claim, "train")
        store.finish(claim, JobState.SUCCEEDED, result={"metrics": {}, "artifacts": []})

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    followed = aetrain(served, "logs", "-f", job.id)
    thread.join()
    assert followed.exit_code == 0, followed.output
    assert followed.stdout == "epoch 0\nepoch 1\nepoch 2\n"
    assert f"{job.id} is queued: waiting for its stage to start" in followed.stderr


def test_status_of_a_failed_job_shows_the_end_of_its_log(
    served: str, store: JobStore, storage: LocalStorage
) -> None:
    claim = running_job(store)
    tail = "Traceback (most recent call last):\n  ...\nValueError: boom"
    store.finish(claim, JobState.FAILED, error="stage train failed: ValueError: boom",
                 error_tail=tail)  # fmt: skip
    shown = aetrain(served, "status", claim.job.id)
    assert shown.exit_code == 0 and "failed" in shown.stdout
    assert "the end of the failing stage's log:" in shown.stdout and tail in shown.stdout


def test_every_command_and_option_in_docs_cli_md_exists() -> None:
    import re

    import typer

    root: Any = typer.main.get_command(cli_app)  # a click group (typer may vendor click)
    table = [line for line in (Path(__file__).parents[2] / "docs" / "cli.md").read_text()
             .splitlines() if line.startswith("| `aetrain ")]  # fmt: skip
    usages = [u for line in table for u in re.findall(r"`(aetrain [^`]+)`", line)]
    assert len(usages) >= 15
    for usage in usages:
        words = usage.replace("[", " ").replace("]", " ").split()[1:]
        command = root
        while words and words[0] in getattr(command, "commands", {}):
            command = command.commands[words.pop(0)]
        assert command is not root, usage
        options = {o for p in command.params for o in [*p.opts, *p.secondary_opts]}
        for word in words:
            if word.startswith("-"):
                assert word in options, f"{usage}: {word} is not an option of the command"

"""A dispatcher frozen past its lease (SIGSTOP) while its job trains, then woken (SIGCONT).

The other dispatcher takes the job over; the frozen one's warm group is not frozen with it
(SIGSTOP stops one process), sees the lease gone and ends the stage, then ends itself once
the frozen dispatcher's heartbeat lapses; the woken dispatcher writes nothing: not the new
owner's grant, not its checkpoints, not artifacts, not the record. Real Redis, real local
Ray; the frozen dispatcher is a `python -m workers` process, the one that takes over runs in
the test's process on the session's warm group (a process and a group start fewer).
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.jobs import JobRecord, JobState
from shared.settings import Settings
from shared.specs import parse_job_spec
from shared.storage import LocalStorage
from shared.store import JobStore
from tests.conftest import train_worker_pids
from tests.specs import digits_spec
from tests.workers.test_dispatcher import running, wait_for
from workers.checkpoints import MANIFEST_FILE, latest_valid_checkpoint, load_state
from workers.dispatcher import Dispatcher
from workers.group_pool import GroupPool

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

LEASE_TTL_S = 3
# Long enough that the new owner still trains well after the frozen one wakes. The stale run
# trains until the takeover: alone on this machine it reached epoch 77, and with 150 epochs
# the job ended during the checks below.
EPOCHS, CHECKPOINT_EVERY, BATCH, FREEZE_AT = 200, 10, 32, 20


def children(pid: int, name: str) -> list[int]:
    """Live (not zombie) processes whose parent is `pid` and whose command line has `name`."""
    out = subprocess.run(["ps", "-eo", "pid,ppid,stat,args"], capture_output=True, text=True)
    found = []
    for line in out.stdout.splitlines()[1:]:
        child, parent, stat, args = line.split(None, 3)
        if int(parent) == pid and name in args and not stat.startswith("Z"):
            found.append(int(child))
    return found


def group_drivers(dispatcher: int) -> list[int]:
    """The live drivers of a dispatcher's warm groups: the children of its group launcher."""
    return [driver for launcher in children(dispatcher, "workers.group_launcher")
            for driver in children(launcher, "workers.group_launcher")]  # fmt: skip


class Peak(threading.Thread):
    """The most Ray Train workers seen alive at once (stopped ones too), sampled until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.most, self.stopping = 0, threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.1):
            self.most = max(self.most, len(train_worker_pids()))


@pytest.fixture
def first_dispatcher(
    settings: Settings, ray_address: str, tmp_path: Path, one_group_pool: GroupPool
) -> Iterator[subprocess.Popen[bytes]]:
    """A `python -m workers`, the one to freeze; the session keeps at most one idle group
    (the test counts workers), which the second dispatcher takes over on."""
    env = {**os.environ, "AETRAIN_REDIS_URL": settings.require_redis_url(),
           "AETRAIN_STORAGE": str(settings.storage_root), "RAY_ADDRESS": ray_address,
           "RAY_AUTH_MODE": "token", "AETRAIN_LEASE_TTL_S": str(LEASE_TTL_S)}  # fmt: skip
    with open(tmp_path / "first.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "workers"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip
    yield proc
    proc.send_signal(signal.SIGCONT)  # a stopped process would not see its SIGTERM
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def second_dispatcher(
    store: JobStore, storage: LocalStorage, settings: Settings, ray_address: str,
    one_group_pool: GroupPool,
) -> Iterator[Callable[[], Dispatcher]]:  # fmt: skip
    """Starts, when called, a dispatcher in this process on the session's pool."""
    with contextlib.ExitStack() as started:

        def start() -> Dispatcher:
            dispatcher = Dispatcher(store, storage, settings.require_redis_url(), ray_address,
                                    lease_ttl_s=LEASE_TTL_S, dispatcher_id="second",
                                    pool=one_group_pool)  # fmt: skip
            return started.enter_context(running(dispatcher))

        yield start


def newest_whole_checkpoint(run_folder: Path) -> str:
    """The newest whole checkpoint, read while the new owner writes and prunes them (a
    checkpoint every ~0.5 s here). One listed, then pruned before it was read, is skipped for
    its missing files: if that left none, the run folder is listed again. A checkpoint
    skipped for any other reason fails the test (it failed once with none left, in CI)."""
    for _ in range(5):
        said: list[str] = []
        newest = latest_valid_checkpoint(run_folder, say=said.append)
        skipped = [line for line in said if line.startswith("resume: skipped")]
        pruned = [line for line in skipped
                  if "No such file" in line or f"no {MANIFEST_FILE}" in line]  # fmt: skip
        assert skipped == pruned, skipped
        if newest is not None:
            return newest
    raise AssertionError(f"no whole checkpoint in {run_folder} in 5 listings")


def test_a_dispatcher_frozen_past_its_lease_and_woken_leaves_the_new_owner_alone(
    store: JobStore, storage: LocalStorage, first_dispatcher: subprocess.Popen[bytes],
    second_dispatcher: Callable[[], Dispatcher], tmp_path: Path,
) -> None:  # fmt: skip
    first = first_dispatcher
    wait_for(lambda: store.dispatchers.live_count() == 1, 60, "the first dispatcher")
    spec = digits_spec(epochs=EPOCHS, checkpoint_every=CHECKPOINT_EVERY, batch_size=BATCH)
    # Ray would restart a run whose rank raised (here: its epoch refused for a lost lease)
    # and resume it beside the new owner's: the stale run must end whatever this says.
    spec["resources"]["max_failures"] = 2
    job, _ = store.submit(JobRecord.for_spec(parse_job_spec(spec)))
    job_id = job.id
    started = time.monotonic()
    peak = Peak()
    peak.start()

    def epoch() -> int:
        return store.get(job_id).epoch or 0

    def seconds() -> str:
        return f"{time.monotonic() - started:.1f} s"

    def lease_token() -> int:
        # Not the attempt number: a claim that loses its race to another still used a token.
        return int(store.redis.get(store.keys.lease(job_id)) or 0)

    wait_for(lambda: epoch() >= FREEZE_AT, 90, f"epoch {FREEZE_AT}")
    assert group_drivers(first.pid)
    second_dispatcher()
    wait_for(lambda: store.dispatchers.live_count() == 2, 30, "the second dispatcher")
    old_token = lease_token()
    first.send_signal(signal.SIGSTOP)
    frozen_at, frozen_epoch = time.monotonic(), epoch()
    print(f"{seconds()}: froze dispatcher {first.pid} at epoch {frozen_epoch}")

    wait_for(lambda: store.get(job_id).takeovers == 1, 30, "the takeover")
    print(f"{seconds()}: taken over {time.monotonic() - frozen_at:.1f} s after the freeze")
    # Its group saw the lease go and ended the stage at once; then the group saw its frozen
    # dispatcher's heartbeat lapse and ended itself, giving its CPU back to Ray for the new
    # owner (its launcher, not frozen, reaps it).
    wait_for(lambda: not group_drivers(first.pid), 20, "the stale group's end")
    stale_epochs = [e for _, e in store.metrics_after(job_id) if e["token"] == old_token]
    print(f"{seconds()}: stale group ended; its last epoch {stale_epochs[-1]['epoch']}")

    new_token = lease_token()
    assert new_token > old_token
    wait_for(lambda: any(e["token"] == new_token for _, e in store.metrics_after(job_id)), 60,
             "the new owner's first epoch")  # fmt: skip
    resumed_at = epoch()
    wait_for(lambda: epoch() >= resumed_at + CHECKPOINT_EVERY + 2, 60, "the new owner's training")
    first.send_signal(signal.SIGCONT)
    print(f"{seconds()}: woke dispatcher {first.pid} at epoch {epoch()}")

    # While the new owner trains: its grant is in place, its checkpoints whole.
    run_folder = storage.runs_root / storage.run_name(job_id, "train")
    checks = 0
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline and epoch() < EPOCHS - 5:
        assert store.get(job_id).state is JobState.RUNNING
        grants = store.redis.hgetall(store.keys.scheduler)
        assert list(grants) == [f"{job_id}/train"], grants
        grant = json.loads(grants[f"{job_id}/train"])
        assert grant["token"] == str(new_token) and grant["granted"], grant
        assert store.scheduler.reserved() == ({"CPU": 1.0}, 0)
        newest = newest_whole_checkpoint(run_folder)
        assert load_state(newest)["epoch"] >= resumed_at - 1
        checks += 1
        time.sleep(0.5)
    print(f"{seconds()}: {checks} checks of the grant and checkpoints, at epoch {epoch()}")
    assert checks >= 3, "the new owner finished during the checks: more epochs"
    assert first.poll() is None  # woken, alive, and idle

    done: Any = wait_for(lambda: (j := store.get(job_id)).state is not JobState.RUNNING and j,
                         90, "the job to end")  # fmt: skip
    peak.stopping.set()
    print(f"{seconds()}: {done.state}")
    assert done.state is JobState.SUCCEEDED, done.error
    assert done.attempts == 2 and done.takeovers == 1

    # One live run at a time: once the new token published, the old one never did again.
    tokens = [e["token"] for _, e in store.metrics_after(job_id)]
    switch = tokens.index(new_token)
    assert set(tokens[:switch]) == {old_token} and set(tokens[switch:]) == {new_token}, tokens
    history = store.metrics_history(job_id)
    assert [m["epoch"] for m in history] == list(range(EPOCHS))
    # The frozen dispatcher's idle group and the new owner's may overlap for a few seconds
    # (until the heartbeat lapses), never more: a third worker would be a run too many.
    assert peak.most <= 2, peak.most

    # The artifacts are the new owner's only; the frozen one wrote none on waking.
    assert done.result["folder"] == f"jobs/{job_id}/attempt-{new_token}"
    folders = sorted(p.name for p in (storage.root / "jobs" / job_id).glob("attempt-*"))
    assert folders == [f"attempt-{new_token}"]
    final = latest_valid_checkpoint(run_folder, say=None)
    assert final is not None and load_state(final)["epoch"] == EPOCHS - 1

    # Woken, the frozen dispatcher saw its lease gone (its lease keeper or its stage's
    # outcome, whichever came first) and tried no write of the record: no "failed" to record.
    frozen_log = (tmp_path / "first.log").read_text()
    assert f"job {job_id}: lease lost; another runner owns it now" in frozen_log
    assert f"job {job_id} failed" not in frozen_log and "could become" not in frozen_log

"""Warm worker groups on a real local Ray: reuse, isolation, chains, keep-warm and letting go."""

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from fastapi.testclient import TestClient

from shared.settings import Settings
from shared.storage import LocalStorage
from shared.store import JobStore
from tests.conftest import train_worker_pids
from tests.specs import digits_spec
from tests.workers.test_dispatcher import running, wait_for, wait_until_ended
from workers.dispatcher import Dispatcher
from workers.group_pool import GroupPool

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]


@pytest.fixture
def start_dispatcher(
    store: JobStore, storage: LocalStorage, settings: Settings, ray_address: str,
    empty_group_pool: GroupPool,
) -> Iterator[Callable[..., Dispatcher]]:  # fmt: skip
    """Dispatchers with pools of their own (the session's is emptied first, for the CPUs)."""
    with contextlib.ExitStack() as started:

        def start(**options: Any) -> Dispatcher:
            dispatcher = Dispatcher(store, storage, settings.require_redis_url(), ray_address,
                                    lease_ttl_s=10.0, dispatcher_id="d1", **options)  # fmt: skip
            return started.enter_context(running(dispatcher))

        yield start


def losses(store: JobStore, job_id: str) -> list[float]:
    return [m["train_loss"] for m in store.metrics_history(job_id)]


def test_a_job_on_a_warm_group_after_another_trains_exactly_as_on_a_fresh_group(
    client: TestClient, store: JobStore, start_dispatcher: Callable[..., Dispatcher]
) -> None:
    dispatcher = start_dispatcher()
    job = digits_spec(epochs=4, seed=3)
    job["model"]["latent_dim"] = 8
    other = digits_spec(epochs=3, seed=11)  # another model, data order, noise and optimizer
    other["model"].update(hidden=[48], latent_dim=24)
    other["objective"] = {"loss": "mse", "denoising": {"type": "gaussian", "std": 0.3}}

    ids = []
    for spec in (job, other, job):  # the first on a fresh group, the last after another job
        ids.append(client.post("/v1/jobs", json=spec).json()["id"])
        assert wait_until_ended(client, ids[-1], 120)["state"] == "succeeded"
    (group,) = dispatcher.pool.groups.values()
    assert group.stages == 3  # all three on one group
    # Ray Train's controller sets up the process group without importing torch (group_run.py).
    controllers = train_worker_pids(b"TrainController")
    assert controllers and not any(b"libtorch" in Path(f"/proc/{pid}/maps").read_bytes()
                                   for pid in controllers)  # fmt: skip
    assert all(b"libtorch" in Path(f"/proc/{pid}/maps").read_bytes() for pid in train_worker_pids())
    first, _, again = (losses(store, job_id) for job_id in ids)
    # Bit for bit: no weights, optimizer state, data or random stream carried over.
    assert again == first and len(first) == 4


def test_a_chain_of_stages_trains_on_one_group(
    client: TestClient, store: JobStore, storage: LocalStorage,
    start_dispatcher: Callable[..., Dispatcher],
) -> None:  # fmt: skip
    spec: dict[str, Any] = {
        "kind": "stacked",
        "data": {"dataset": "digits"},
        "layers": [{"units": 32}, {"units": 12}],
        "training": {"epochs": 2},
        "finetune": {"epochs": 2},
        "baseline": False,  # it trains beside the chain, on a group of its own
    }
    dispatcher = start_dispatcher()
    job_id = client.post("/v1/jobs", json=spec).json()["id"]
    assert wait_until_ended(client, job_id, 120)["state"] == "succeeded"
    logs = storage.root / "jobs" / job_id / "logs"
    groups = {group_named_in(logs / f"{stage}-attempt-1.log")
              for stage in ("layer1", "layer2", "finetune")}  # fmt: skip
    assert groups == set(dispatcher.pool.groups), groups
    (group,) = dispatcher.pool.groups.values()
    assert group.stages == 3
    # The ranks' own log lines, which Ray forwards to the group's driver, name job and stage.
    started = {(line["job_id"], line["stage"]) for line in own_lines(group.folder / "group.log")
               if line["message"].startswith("rank 0 of 1: start")}  # fmt: skip
    assert started >= {(job_id, stage) for stage in ("layer1", "layer2", "finetune")}, started


def own_lines(log: Path, timeout_s: float = 20.0) -> list[dict[str, Any]]:
    """aetrain's JSON lines in a group's log, once the finetune's start has been forwarded
    (Ray's log monitor reads the workers' files every so often)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = []
        for text in log.read_text(errors="replace").splitlines():
            start = text.find('{"ts"')  # after Ray's "(RayTrainWorker pid=...)" prefix
            if start >= 0 and '"logger": "aetrain.' in text:
                found.append(json.loads(text[start:]))
        if any(line.get("stage") == "finetune" for line in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def group_named_in(log: Path) -> str:
    (line,) = [line for line in log.read_text().splitlines() if " of group " in line]
    return line.rsplit(" of group ", 1)[1].split(";")[0]


def test_a_kept_warm_group_trains_the_first_job_and_makes_way_for_a_bigger_stage(
    client: TestClient, store: JobStore, start_dispatcher: Callable[..., Dispatcher]
) -> None:
    assert ray.cluster_resources()["CPU"] == 2
    dispatcher = start_dispatcher(warm_groups=1, warm_idle_s=1.0)
    wait_for(lambda: dispatcher.pool.idle_count() == 1
             and all(g.channel.is_ready() for g in dispatcher.pool.groups.values())
             and len(train_worker_pids()) == 1, 90, "a group started with no job")  # fmt: skip
    assert list(store.scheduler.holds().values()) == [{"CPU": 1.0}]
    (warm,) = train_worker_pids()

    small = client.post("/v1/jobs", json=digits_spec(epochs=2)).json()["id"]
    assert wait_until_ended(client, small, 60)["state"] == "succeeded"
    assert train_worker_pids() == [warm]  # trained by the warm group
    result = client.get(f"/v1/jobs/{small}/result").json()["metrics"]
    assert result["start_seconds"] < result["fit_seconds"]

    # Kept past its idle time while nothing waits; let go at once for a 2-worker stage,
    # whose own group is let go after its idle time; then one is kept warm again.
    big = client.post("/v1/jobs", json=digits_spec(epochs=2, workers=2)).json()["id"]
    assert wait_until_ended(client, big, 120)["state"] == "succeeded"
    assert warm not in train_worker_pids()
    wait_for(lambda: [g.shape.workers for g in dispatcher.pool.groups.values()] == [1]
             and len(train_worker_pids()) == 1, 90, "one 1-worker group warm again")  # fmt: skip
    wait_for(lambda: list(store.scheduler.holds().values()) == [{"CPU": 1.0}], 10, "its hold")
    assert store.scheduler.reserved() == ({"CPU": 1.0}, 0)

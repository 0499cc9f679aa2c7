"""A cluster that grows: a stage larger than the Ray cluster is now, but within what it may
grow to (AETRAIN_CLUSTER_MAX_CPUS), waits for a second node and trains across both.

The second node is a real `ray start --address` of the session's cluster on this machine.
"""

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import ray
from fastapi.testclient import TestClient

from shared.settings import Settings
from shared.storage import Storage
from shared.store import JobStore
from tests.conftest import free_port
from tests.specs import digits_spec
from tests.workers.test_dispatcher import wait_for, wait_until_ended
from workers.dispatcher import Dispatcher
from workers.group_pool import GroupPool

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 0))


@pytest.fixture
def add_node(ray_address: str, tmp_path: Path) -> Iterator[Callable[[], None]]:
    """Starts a 2-CPU node joining the session's cluster when called; gone at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        ports = [str(free_port()) for _ in range(4)]
        command = [
            str(Path(sys.executable).with_name("ray")),
            "start", f"--address={ray_address}", "--num-cpus=2", "--block",
            f"--dashboard-agent-listen-port={ports[0]}",
            f"--dashboard-agent-grpc-port={ports[1]}",
            f"--metrics-export-port={ports[2]}", f"--runtime-env-agent-port={ports[3]}",
        ]  # fmt: skip
        with open(tmp_path / "node.log", "wb") as log:
            started.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "RAY_AUTH_MODE": "token"}))

    yield start
    for node in started:
        node.terminate()
        node.wait(timeout=60)
    # Later tests count on the session's 2 CPUs.
    wait_for(lambda: cluster_cpus() == 2, 90, "the second node to leave the cluster")


def test_a_stage_within_what_the_cluster_may_grow_to_waits_for_a_node_and_spans_both(
    client: TestClient, store: JobStore, storage: Storage, settings: Settings, ray_address: str,
    empty_group_pool: GroupPool, add_node: Callable[[], None],
) -> None:  # fmt: skip
    assert cluster_cpus() == 2
    dispatcher = Dispatcher(store, storage, settings.require_redis_url(), ray_address,
                            lease_ttl_s=10.0, slots=2, cluster_max={"CPU": 4})  # fmt: skip
    thread = threading.Thread(target=dispatcher.run_forever, daemon=True)
    thread.start()
    try:
        too_big = client.post("/v1/jobs", json=digits_spec(epochs=2, workers=5)).json()["id"]
        failed = wait_until_ended(client, too_big, 30)
        assert failed["state"] == "failed", failed
        assert "more than the whole cluster may grow to (CPU 4)" in failed["error"], failed

        job_id = client.post("/v1/jobs", json=digits_spec(epochs=4, workers=3)).json()["id"]
        time.sleep(8.0)  # admitted, granted, its group pending in Ray: waiting, not failed
        waiting = client.get(f"/v1/jobs/{job_id}").json()
        assert waiting["state"] == "running" and waiting["epoch"] is None, waiting

        add_node()
        done = wait_until_ended(client, job_id, 180)
    finally:
        dispatcher.stop()
        thread.join(timeout=60)
    assert done["state"] == "succeeded", done["error"]
    log = (storage.root / "jobs" / job_id / "logs" / "train-attempt-1.log").read_text()
    (header,) = [line for line in log.splitlines() if "rank nodes" in line]
    nodes = header.split("rank nodes ", 1)[1].split()
    assert len(nodes) == 3 and len(set(nodes)) == 2, header  # three ranks on two nodes

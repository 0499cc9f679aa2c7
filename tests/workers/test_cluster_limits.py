"""What the cluster may grow to: the autoscaler's reported cluster config, unless a setting
says otherwise; and admission against it (a stage over it fails at once, one within it waits).

The Ray test reports a cluster config into the session's GCS as an autoscaler does (the GCS
client's `report_cluster_config`), and reports an empty one at the end.
"""

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import ray
from fastapi.testclient import TestClient
from ray._private.state import GlobalState
from ray._raylet import GcsClient
from ray.core.generated.autoscaler_pb2 import ClusterConfig, NodeGroupConfig

from shared.settings import Settings
from shared.storage import Storage
from shared.store import JobStore
from tests.specs import digits_spec
from tests.workers.test_dispatcher import wait_for, wait_until_ended
from workers.cluster_limits import (
    UNBOUNDED,
    ClusterLimits,
    combine,
    limits_from_config,
    read_autoscaler_limits,
)
from workers.dispatcher import Dispatcher
from workers.group_pool import GroupPool


def group(name: str, max_count: int, **resources: int) -> NodeGroupConfig:
    return NodeGroupConfig(name=name, resources=resources, max_count=max_count)


CPU_AND_GPU_GROUPS = ClusterConfig(node_group_configs=[
    group("head", 1, CPU=4),
    group("cpu", 10, CPU=8),
    group("gpu", 3, CPU=16, GPU=2),
    group("off", 0, CPU=64, GPU=8),  # max_count 0: never started
])  # fmt: skip


def test_the_limit_is_the_sum_over_node_groups_of_their_most_nodes() -> None:
    assert limits_from_config(CPU_AND_GPU_GROUPS) == {"CPU": 4 + 80 + 48, "GPU": 6}


def test_max_resources_caps_the_node_groups_and_an_unlimited_group() -> None:
    capped = ClusterConfig(max_resources={"CPU": 100}, node_group_configs=[
        group("cpu", 10, CPU=8), group("gpu", -1, CPU=16, GPU=2),
    ])  # fmt: skip
    assert limits_from_config(capped) == {"CPU": 100, "GPU": UNBOUNDED}
    assert limits_from_config(ClusterConfig(max_resources={"GPU": 4})) == {"GPU": 4}


def test_no_config_or_an_empty_one_sets_no_limit() -> None:
    assert limits_from_config(None) == {}
    assert limits_from_config(ClusterConfig()) == {}
    assert limits_from_config(ClusterConfig(node_group_configs=[group("off", 0, CPU=8)])) == {}


@pytest.mark.parametrize("config", [
    CPU_AND_GPU_GROUPS,
    ClusterConfig(max_resources={"CPU": 20}, node_group_configs=[group("cpu", 4, CPU=8)]),
    ClusterConfig(node_group_configs=[group("gpu", -1, CPU=8, GPU=1)]),
    ClusterConfig(node_group_configs=[group("cpu", 2, CPU=8)]),
    ClusterConfig(),
])  # fmt: skip
def test_the_limit_is_the_one_ray_train_checks_a_worker_group_against(config: Any) -> None:
    """Ray Train fails a worker group over Ray's count before it waits for its placement
    group; admission counting the same never admits a stage Ray would refuse."""
    rays = {kind: GlobalState._calculate_max_resource_from_cluster_config(config, kind)
            for kind in ("CPU", "GPU")}  # fmt: skip
    assert limits_from_config(config) == {k: float(v) for k, v in rays.items() if v is not None}


def test_a_setting_wins_over_the_autoscaler_s_config() -> None:
    assert combine({"CPU": 4}, {"CPU": 132, "GPU": 6}) == {"CPU": 4, "GPU": 6}
    assert combine({}, {"CPU": 132}) == {"CPU": 132}
    assert combine({"GPU": 1}, {}) == {"GPU": 1}


@pytest.fixture
def report_cluster_config(ray_address: str) -> Iterator[Callable[[ClusterConfig], None]]:
    """Reports a cluster config as the autoscaler does; an empty one at the end, which leaves
    none (later tests of the session count on the cluster that is up)."""
    gcs = GcsClient(address=ray_address)
    yield lambda config: gcs.report_cluster_config(config.SerializeToString())  # [ray]
    gcs.report_cluster_config(ClusterConfig().SerializeToString())
    assert read_autoscaler_limits() == {}


def pending_bundles() -> list[int]:
    """The bundle counts of placement groups that wait for resources."""
    table = ray.util.placement_group_table().values()
    return [len(pg["bundles"]) for pg in table if pg["state"] == "PENDING"]


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_the_autoscaler_s_maximum_fails_a_larger_stage_at_once_and_lets_one_within_it_wait(
    client: TestClient, store: JobStore, storage: Storage, settings: Settings, ray_address: str,
    empty_group_pool: GroupPool, report_cluster_config: Callable[[ClusterConfig], None],
) -> None:  # fmt: skip
    assert ray.cluster_resources()["CPU"] == 2
    # The head as up now and one more node of 2 CPUs (the proto lists the head's group too).
    report_cluster_config(ClusterConfig(node_group_configs=[
        group("head", 1, CPU=2), group("workers", 1, CPU=2),
    ]))  # fmt: skip
    assert read_autoscaler_limits() == {"CPU": 4}
    assert ClusterLimits({"CPU": 3}).most() == {"CPU": 3}  # an operator's setting wins
    dispatcher = Dispatcher(store, storage, settings.require_redis_url(), ray_address,
                            lease_ttl_s=10.0, slots=2)  # no AETRAIN_CLUSTER_MAX_*  # fmt: skip
    thread = threading.Thread(target=dispatcher.run_forever, daemon=True)
    thread.start()
    try:
        too_big = client.post("/v1/jobs", json=digits_spec(epochs=2, workers=5)).json()["id"]
        failed = wait_until_ended(client, too_big, 30)
        assert failed["state"] == "failed", failed
        assert "more than the whole cluster may grow to (CPU 4)" in failed["error"], failed
        # At once: refused at admission, before its stage ever asked Ray for a group.
        assert failed["stages"][0]["started_at"] is None, failed
        assert 5 not in pending_bundles()

        job_id = client.post("/v1/jobs", json=digits_spec(epochs=2, workers=3)).json()["id"]
        # Its group passed Ray Train's own check against the config and waits for a node.
        wait_for(lambda: 3 in pending_bundles(), 90, "the stage's placement group to wait")
        waiting = client.get(f"/v1/jobs/{job_id}").json()
        assert waiting["state"] == "running" and waiting["epoch"] is None, waiting
        client.post(f"/v1/jobs/{job_id}/cancel")
        cancelled = wait_until_ended(client, job_id, 60)
        assert cancelled["state"] == "cancelled", cancelled
    finally:
        dispatcher.stop()
        thread.join(timeout=60)

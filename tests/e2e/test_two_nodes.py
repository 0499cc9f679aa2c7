"""Two Ray nodes on this machine: `aetrain worker` and `aetrain api` run against the session's
Ray (the head), their storage a bucket on the S3 server. A 2-rank DDP job waits, admitted,
for the second node (within AETRAIN_CLUSTER_MAX_CPUS) and trains with one rank on each node;
the second node's raylet is killed mid-training, and the job resumes from its checkpoint in
the bucket when the node is back; killed again, with max_failures spent, the job fails at
once with the reason.

Everything the test knows of the job comes through the API (the record and the stage log),
never from the storage's files, so the storage may be a local folder or an object store.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray

from tests.conftest import descendants, free_port
from tests.specs import digits_spec
from tests.workers.test_dispatcher import wait_for
from workers.group_pool import GroupPool

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
TERMINAL = {"succeeded", "failed", "cancelled"}
NODE_CPUS = 2  # as many as the head (the session's Ray): each node holds one 2-CPU rank
SECOND_NODE = "second_node"  # the custom resource that tells the second node apart
EPOCHS = 60  # 0.3-1 s each on 2 cores: both kills land well before the end


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 0))


class SecondNode:
    """A `ray start --address --block` joining the session's cluster with NODE_CPUS and the
    SECOND_NODE resource; it can be started again after its raylet was killed. Every process
    seen under it is remembered, so those that outlive their `ray start` can be ended."""

    def __init__(self, address: str, log_dir: Path) -> None:
        self.address, self.log_dir = address, log_dir
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.seen: dict[int, bytes] = {}  # pid -> command line

    def start(self) -> None:
        self.starts += 1
        ports = [str(free_port()) for _ in range(4)]
        command = [
            str(Path(sys.executable).with_name("ray")),
            "start", f"--address={self.address}", f"--num-cpus={NODE_CPUS}",
            f"--resources={json.dumps({SECOND_NODE: 1})}", "--block",
            f"--dashboard-agent-listen-port={ports[0]}",
            f"--dashboard-agent-grpc-port={ports[1]}",
            f"--metrics-export-port={ports[2]}", f"--runtime-env-agent-port={ports[3]}",
        ]  # fmt: skip
        with open(self.log_dir / f"node-{self.starts}.log", "wb") as log:
            env = {**os.environ, "RAY_AUTH_MODE": "token"}
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

    def node_id(self) -> str | None:
        """The Ray node id of the live second node, once the cluster lists it."""
        for node in ray.nodes():
            if node["Alive"] and SECOND_NODE in node["Resources"]:
                return str(node["NodeID"])
        return None

    def look(self) -> None:
        """Remember the processes under the running `ray start` now."""
        if self.process is not None and self.process.poll() is None:
            for pid in descendants(self.process.pid):
                if (cmdline := _cmdline(pid)) is not None:
                    self.seen[pid] = cmdline

    def raylet_pid(self) -> int:
        self.look()
        for pid, cmdline in self.seen.items():
            if cmdline.split(b"\0")[0].endswith(b"/raylet") and _cmdline(pid) == cmdline:
                return pid
        raise AssertionError("no raylet under the second node's `ray start`")

    def leftovers(self) -> list[int]:
        """Processes seen under the node that still run, though their `ray start` ended."""
        return [pid for pid, cmdline in self.seen.items() if _cmdline(pid) == cmdline]

    def stop(self) -> None:
        self.look()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # `ray start --block` stops its node's processes
            self.process.wait(timeout=60)
        for pid in self.leftovers():
            os.kill(pid, signal.SIGKILL)


def _cmdline(pid: int) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes() or None  # empty: a zombie
    except OSError:
        return None


class Service:
    """`aetrain api` and `aetrain worker`, as an operator runs them beside a Ray cluster."""

    def __init__(self, redis_url: str, storage: str, ray_address: str, home: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "AETRAIN_REDIS_URL": redis_url,
            # Its own keys in the session's Redis: the in-process tests' warm groups and
            # scheduler (prefix `aetrain`) are not this worker's.
            "AETRAIN_KEY_PREFIX": "twonodes",
            "AETRAIN_STORAGE": storage,
            "AETRAIN_HOME": str(home),
            "AETRAIN_AUTH": "off",
            "AETRAIN_LOG_FORMAT": "plain",
            "RAY_ADDRESS": ray_address,
            "RAY_AUTH_MODE": "token",
            # What the cluster may grow to (the head and one node of NODE_CPUS): a stage
            # within it waits for the node; a larger one fails at once.
            "AETRAIN_CLUSTER_MAX_CPUS": str(2 * NODE_CPUS),
        }
        self.home = home
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        for name, args in [("api", ["api", "--port", str(self.port)]), ("worker", ["worker"])]:
            with open(self.home / f"{name}.log", "wb") as log:
                self.processes.append(subprocess.Popen(
                    [sys.executable, "-m", "service.cli", *args], env=self.env, cwd=REPO,
                    stdout=log, stderr=subprocess.STDOUT,
                ))  # fmt: skip

    def wait_ready(self, timeout_s: float = 60) -> None:
        def ready() -> bool:
            for process in self.processes:
                assert process.poll() is None, self.logs()
            try:
                return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout_s, "aetrain api and worker to be ready")

    def job(self, job_id: str) -> dict[str, Any]:
        reply = httpx.get(f"{self.url}/v1/jobs/{job_id}", timeout=10)
        reply.raise_for_status()
        job: dict[str, Any] = reply.json()
        return job

    def wait_for_job(
        self, job_id: str, done: Callable[[dict[str, Any]], bool], timeout_s: float
    ) -> dict[str, Any]:
        """The job once `done` says so or it has ended."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["state"] in TERMINAL or done(job):
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} did not get there: {job}\n{self.logs()}")

    def stage_log(self, job_id: str, stage: str = "train") -> str:
        reply = httpx.get(f"{self.url}/v1/jobs/{job_id}/logs", params={"stage": stage},
                          timeout=10)  # fmt: skip
        return reply.text if reply.status_code == 200 else ""

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}"
                         for p in sorted(self.home.glob("*.log")))  # fmt: skip

    def stop(self) -> None:
        """SIGTERM, as an operator stops them; the worker's group launcher and the drivers of
        its warm groups must end with it."""
        below = {pid: _cmdline(pid) for p in self.processes for pid in descendants(p.pid)}
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        left = wait_for(lambda: not [p for p, c in below.items() if _cmdline(p) == c] or None,
                        30, "the processes under the worker and the api to end")  # fmt: skip
        assert left is True


@pytest.fixture
def two_node_storage(s3_url: str) -> str:
    """Where `aetrain worker` and `aetrain api` keep uploads, checkpoints, logs and artifacts:
    a bucket on the S3 server (tests/conftest.py), so no path is shared between the nodes."""
    return s3_url


@pytest.fixture
def second_node(ray_address: str, tmp_path: Path) -> Iterator[SecondNode]:
    node = SecondNode(ray_address, tmp_path)
    yield node
    node.stop()
    # Later tests count on the session's 2 CPUs.
    wait_for(lambda: cluster_cpus() == NODE_CPUS, 90, "the second node to leave the cluster")


@pytest.fixture
def service(
    redis_url: str, two_node_storage: str, ray_address: str, tmp_path: Path,
    empty_group_pool: GroupPool, second_node: SecondNode,
) -> Iterator[Service]:  # fmt: skip
    # empty_group_pool: the session's idle warm groups would hold the head's CPUs in Ray,
    # which this worker's scheduler (its own key prefix) cannot see. second_node: stopped
    # after the worker, whose warm group has a rank on it.
    stack = Service(redis_url, two_node_storage, ray_address, tmp_path / "home")
    yield stack
    stack.stop()


def rank_nodes(log: str) -> list[list[str]]:
    """Each start's "rank nodes" (12 characters of a Ray node id per rank, in rank order)."""
    return [line.split("rank nodes ", 1)[1].split() for line in log.splitlines()
            if "rank nodes " in line]  # fmt: skip


def test_a_two_rank_job_waits_for_a_node_spans_both_resumes_when_it_is_back_and_fails_once_spent(
    service: Service, second_node: SecondNode
) -> None:
    t0 = time.monotonic()
    timeline: list[str] = []

    def note(what: str) -> None:
        timeline.append(f"{time.monotonic() - t0:6.1f} s  {what}")

    service.start()
    service.wait_ready()
    assert cluster_cpus() == NODE_CPUS
    note("api and worker ready, on the head alone")

    # More than the cluster may ever grow to: refused at once, naming the limit.
    too_big = digits_spec(epochs=2, workers=3)
    too_big["resources"]["cpus_per_worker"] = NODE_CPUS
    reply = httpx.post(f"{service.url}/v1/jobs", json=too_big, timeout=10)
    assert reply.status_code == 201, reply.text
    failed = service.wait_for_job(reply.json()["id"], lambda j: False, 60)
    assert failed["state"] == "failed", failed
    assert "more than the whole cluster may grow to (CPU 4)" in failed["error"], failed

    # Each rank asks for as many CPUs as one node has, so no node holds both: Ray Train's
    # placement group puts one rank on each (no placement strategy of ours, and no resource
    # the product does not know of, is needed). With the head alone it waits, admitted.
    spec = digits_spec(epochs=EPOCHS, workers=2, checkpoint_every=1)
    spec["resources"] = {"workers": 2, "cpus_per_worker": NODE_CPUS, "max_failures": 1,
                         "progress_timeout_s": 120}  # fmt: skip
    reply = httpx.post(f"{service.url}/v1/jobs", json=spec, timeout=10)
    assert reply.status_code == 201, reply.text
    job_id = reply.json()["id"]
    time.sleep(3.0)
    waiting = service.job(job_id)
    assert waiting["state"] == "running" and waiting["epoch"] is None, waiting
    note("the 2-rank job waits for room, running")

    second_node.start()
    first_id = wait_for(second_node.node_id, 60, "the second node to join")
    note(f"second node {first_id[:12]} up")
    job = service.wait_for_job(job_id, lambda j: (j["epoch"] or 0) >= 2, 120)
    assert job["state"] == "running", (job, service.logs())
    note(f"epoch {job['epoch']} done")
    (first,) = rank_nodes(service.stage_log(job_id))
    head_id = ray.get_runtime_context().get_node_id()
    assert sorted(first) == sorted([head_id[:12], first_id[:12]]), first

    raylet = second_node.raylet_pid()
    os.kill(raylet, signal.SIGKILL)
    killed_at = service.job(job_id)["epoch"]
    note(f"raylet {raylet} of the second node killed at epoch {killed_at}")
    assert second_node.process is not None
    wait_for(lambda: second_node.process and second_node.process.poll() is not None, 30,
             "`ray start --block` to end with its raylet")  # fmt: skip
    # The rank on the node ends with its raylet by itself (Ray's workers fate-share with it).
    wait_for(lambda: not second_node.leftovers() or None, 30, "the node's processes to end")
    note("every process of the second node ended")
    # The head's GCS marks the node dead once it has missed its health checks.
    wait_for(lambda: second_node.node_id() is None, 60, "Ray to see the node dead")
    stalled = service.job(job_id)
    note(f"Ray sees the second node dead; the job: {stalled['state']}, epoch {stalled['epoch']}")
    # The rank on the head failed in its collective (gloo: connection closed by peer) as soon
    # as its peer went with the raylet (a second or so: a few more epochs may finish first);
    # Ray Train asked for a new group at once, but its placement group (one 2-CPU bundle per
    # rank) has no room until the node is back: the job runs on, not training.
    time.sleep(2.0)
    job = service.job(job_id)
    assert job["state"] == "running" and job["epoch"] == stalled["epoch"], "\n".join(
        [*timeline, service.stage_log(job_id)]
    )
    last_epoch = job["epoch"]

    second_node.start()
    second_id = wait_for(second_node.node_id, 60, "the second node to join again")
    note(f"second node back as {second_id[:12]}")
    job = service.wait_for_job(job_id, lambda j: (j["epoch"] or 0) >= last_epoch + 3, 120)
    assert job["state"] == "running", (job, service.logs())
    log = service.stage_log(job_id)
    starts = rank_nodes(log)
    assert len(starts) == 2, log
    assert sorted(starts[1]) == sorted([head_id[:12], second_id[:12]]), starts
    # It went on from the newest checkpoint: at most the epoch in flight was trained again.
    (resumed,) = re.findall(r"resume: from checkpoint_\S+ \(epoch (\d+)\)", log)
    assert int(resumed) >= last_epoch - 1, (resumed, last_epoch)
    note(f"resumed from the checkpoint of epoch {resumed}; epoch {job['epoch']} done")

    # Lost again with max_failures (1) spent: the job fails at once with the reason (the rank
    # on the head saw its peer go), not after the progress deadline for a "hung" rank.
    os.kill(second_node.raylet_pid(), signal.SIGKILL)
    note("the second node's raylet killed again")
    done = service.wait_for_job(job_id, lambda j: False, 60)
    note(f"job {done['state']}")
    print("\n".join(["", *timeline]))
    assert done["state"] == "failed", (done, service.logs())
    assert "resources.max_failures is 1" in done["error"], done["error"]
    assert "progress deadline" not in done["error"], done["error"]
    assert done["attempts"] == 1  # one claim all along: Ray Train restarted the group

"""`aetrain up` in a temporary home, for the benches: started, waited for, and stopped.

    with running_stack() as stack:
        record = stack.submit_and_wait(spec)

The stack is the real one (`python -m service.cli up`: its own redis-server, a dispatcher
that starts a local Ray, the API on 127.0.0.1), in a child process of the bench, with the
output of each of its processes under `<home>/logs`.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.redis_keys import Keys  # noqa: E402
from shared.store import JobStore, connect  # noqa: E402

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
READY_TIMEOUT_S = 240.0  # a cold start of Redis, Ray and the API on 2 busy cores


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def children_of(pid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and parent_of(int(p.name)) == pid]  # fmt: skip


class JobFailed(RuntimeError):
    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__(record)
        self.record = record

    def __str__(self) -> str:
        return f"job {self.record['id']} {self.record['state']}: {self.record.get('error')}"


class Stack:
    """A running `aetrain up`; built by `running_stack`."""

    def __init__(self, home: Path, process: subprocess.Popen[bytes], port: int,
                 env: dict[str, str]) -> None:  # fmt: skip
        self.home, self.process, self.env = home, process, env
        self.url = f"http://127.0.0.1:{port}"
        self.redis_url = (home / "redis.url").read_text().strip()  # `up` writes it (embedded.py)
        self.store = JobStore(connect(self.redis_url))
        self.http = httpx.Client(base_url=self.url, timeout=30)

    @property
    def pids(self) -> dict[str, int]:
        """The stack's processes by role: redis, api, dispatcher (as they are now)."""
        found = {}
        for pid in children_of(self.process.pid):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"redis-server" in argv[0]:  # it rewrites its title: "redis-server host:port"
                found["redis"] = pid
            elif b"api" in argv:
                found["api"] = pid
            elif b"worker" in argv:
                found["dispatcher"] = pid
        return found

    def dispatcher(self) -> dict[str, Any]:
        """What the stack's dispatcher last registered: ray_address, slots, running,
        idle_groups (workers/dispatcher.py `_register`, every few seconds)."""
        for raw in self.store.redis.hvals(Keys().dispatchers):
            info: dict[str, Any] = json.loads(raw)
            return info
        raise RuntimeError("no dispatcher has registered (is the stack up?)")

    def ray_address(self) -> str:
        """The GCS address of the stack's Ray cluster."""
        address: str = self.dispatcher()["ray_address"]
        return address

    def submit(self, spec: dict[str, Any]) -> tuple[str, float]:
        """POST the spec; (its job id, the wall-clock time just before the request was sent)."""
        body = httpx.Request("POST", "/", json=spec).content  # encoded before the clock starts
        posted_at = time.time()
        reply = self.http.post("/v1/jobs", content=body,
                               headers={"Content-Type": "application/json"})  # fmt: skip
        reply.raise_for_status()
        job_id: str = reply.json()["id"]
        return job_id, posted_at

    def wait(self, job_id: str, poll_s: float = 0.02, timeout_s: float = 900.0
             ) -> tuple[dict[str, Any], float]:  # fmt: skip
        """Poll GET until the job is terminal; (its record, the wall-clock time it was seen so).

        Raises JobFailed unless it succeeded."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            record: dict[str, Any] = self.http.get(f"/v1/jobs/{job_id}").raise_for_status().json()
            if record["state"] in TERMINAL:
                seen_at = time.time()
                if record["state"] != "succeeded":
                    raise JobFailed(record)
                return record, seen_at
            time.sleep(poll_s)
        raise TimeoutError(f"job {job_id} did not finish within {timeout_s:.0f} s")

    def submit_and_wait(self, spec: dict[str, Any], poll_s: float = 0.02) -> dict[str, Any]:
        """The record of the job once it succeeded; raises JobFailed if it did not."""
        job_id, _ = self.submit(spec)
        return self.wait(job_id, poll_s)[0]

    def result(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = (
            self.http.get(f"/v1/jobs/{job_id}/result").raise_for_status().json()
        )
        return result

    def stop(self) -> None:
        """SIGINT, as Ctrl-C: `up` stops the API, the dispatcher (and its Ray), then Redis."""
        self.http.close()
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _is_ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def running_stack(
    env: dict[str, str] | None = None,
    auth: str = "off",
    keep: bool = False,
    prefix: str = "aetrain-bench-",
) -> Iterator[Stack]:
    """`aetrain up` in a new temporary home until the block ends; `env` is added to its
    environment (limits, AETRAIN_WARM_GROUPS, ...). The home is removed unless `keep`."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    port = free_port()
    full_env = {**os.environ, "AETRAIN_HOME": str(home), "AETRAIN_AUTH": auth,
                "RAY_AUTH_MODE": "token", **(env or {})}  # fmt: skip
    full_env.pop("AETRAIN_REDIS_URL", None)  # never someone else's Redis or Ray
    full_env.pop("RAY_ADDRESS", None)
    with open(home / "up.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "up", "--host", "127.0.0.1", "--port",
             str(port)],
            env=full_env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    stack: Stack | None = None
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _is_ready(f"http://127.0.0.1:{port}"):
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"aetrain up did not become ready; see {home}/up.log and logs/")
            time.sleep(0.5)
        stack = Stack(home, process, port, full_env)
        yield stack
    finally:
        if stack is not None:
            stack.stop()
        elif process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if not keep:
            shutil.rmtree(home, ignore_errors=True)

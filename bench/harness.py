"""The service on this machine for benchmarks: a private redis-server, a local Ray, the HTTP
app and one in-process dispatcher; `run(spec)` submits over HTTP and returns the finished job.
"""

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from service.app import create_app  # noqa: E402
from shared.settings import Settings  # noqa: E402
from shared.storage import LocalStorage  # noqa: E402
from shared.store import JobStore, connect  # noqa: E402
from tests.conftest import free_port, wait_for_ping  # noqa: E402
from workers.dispatcher import Dispatcher  # noqa: E402


@dataclass
class Service:
    client: TestClient
    store: JobStore
    storage: LocalStorage
    redis_url: str
    ray_address: str

    def run(self, spec: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """Submit over HTTP, run to the end; (the job record, wall seconds)."""
        started = time.perf_counter()
        job_id = self.client.post("/v1/jobs", json=spec).json()["id"]
        Dispatcher(self.store, self.storage, self.redis_url, self.ray_address).run_once(2000)
        job: dict[str, Any] = self.client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] != "succeeded":
            raise RuntimeError(f"{spec.get('name')}: {job['state']}: {job['error']}")
        return job, time.perf_counter() - started


@contextmanager
def local_service() -> Iterator[Service]:
    workdir = Path(tempfile.mkdtemp(prefix="aetrain-bench-"))
    port = free_port()
    redis_proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    redis_url = wait_for_ping(f"redis://127.0.0.1:{port}/0")
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.1"
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    # Starlette's TestClient sends `Host: testserver`, which the local (auth off) API refuses
    # unless allowed, as in tests/conftest.py.
    settings = Settings(home=workdir, redis_url=redis_url, auth="off", allowed_hosts="testserver")
    try:
        with TestClient(create_app(settings)) as client:
            yield Service(
                client,
                JobStore(connect(redis_url)),
                LocalStorage(settings.storage_root),
                redis_url,
                ray.get_runtime_context().gcs_address,
            )
    finally:
        ray.shutdown()
        redis_proc.terminate()

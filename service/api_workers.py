"""`aetrain api --workers N`: N uvicorn worker processes on one port, their metrics summed.

One API process is bound by the GIL to one core (docs/benchmarks.md: the API was the
bottleneck of the load bench at 0.98 of a core while the machine had another). With N > 1,
uvicorn's supervisor holds the socket and starts N processes that each build the app from the
environment (service.app.app_from_environment); nothing of a request's state lives in one
process (event-stream slots and limits are counted in Redis). prometheus-client's
multiprocess mode keeps each worker's request histograms in a file of a folder made here, so
`/metrics` (whichever worker answers) and AETRAIN_METRICS_PORT (served by the supervisor)
show the sum.
"""

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shared.settings import Settings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
FOLDER_PREFIX = "aetrain-api-metrics-"  # then the supervisor's pid


@contextmanager
def metrics_folder() -> Iterator[Path]:
    """A new, empty folder for the workers' metric files, named in the environment they
    inherit; removed at the end (a folder of a previous run would add its counts). Folders
    that a killed supervisor left behind (its pid is in the name) are removed first."""
    remove_orphaned_folders(Path(tempfile.gettempdir()))
    folder = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-"))
    os.environ[MULTIPROC_ENV] = str(folder)
    try:
        yield folder
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(folder, ignore_errors=True)


def remove_orphaned_folders(parent: Path) -> list[Path]:
    """Remove the metric folders of supervisors that are no longer running; what was removed."""
    removed = []
    for folder in parent.glob(f"{FOLDER_PREFIX}*-*"):
        pid = folder.name.removeprefix(FOLDER_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def serve_workers(settings: Settings, host: str, port: int, workers: int) -> None:
    """Run the API as `workers` processes until a signal stops the supervisor."""
    import uvicorn
    from prometheus_client import start_http_server

    from service.metrics import JobsCollector, worker_processes_registry
    from shared.store import JobStore, connect

    with metrics_folder():
        server = thread = store = None
        if settings.metrics_port is not None:
            store = JobStore(connect(settings.require_redis_url()), settings.key_prefix)
            jobs = JobsCollector()
            jobs.store = store
            registry = worker_processes_registry(jobs)
            server, thread = start_http_server(
                settings.metrics_port, addr=settings.metrics_host, registry=registry
            )
        try:
            uvicorn.run(
                "service.app:app_from_environment", factory=True, workers=workers, host=host,
                port=port, log_config=None, log_level=settings.log_level.lower(),
                timeout_graceful_shutdown=5,
            )
        finally:
            if server is not None and thread is not None:
                server.shutdown()
                server.server_close()
                thread.join(timeout=5)
            if store is not None:
                store.redis.close()

"""create_app(settings): the FastAPI application; its lifespan owns the Redis connection."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles

from service.errors import install_error_handlers
from service.event_hub import EventHub
from service.guards import RequestGuard
from service.job_reads import JobReads
from service.metrics import ApiMetrics
from service.metrics import router as metrics_router
from service.metrics_http import RequestMetrics, bind_request_log_context
from service.routes import datasets, events, health, jobs, logs
from shared.settings import Settings
from shared.storage import open_storage
from shared.store import JobStore, connect


def operation_id(route: APIRoute) -> str:
    """The route function's name (`submit_job`), not FastAPI's `submit_job_v1_jobs_post`: the
    name a generated client gives its methods, so it must be one a person would write."""
    return route.name


STATIC = Path(__file__).parent / "static"
# The page loads only its own files, and reads pictures through blob: URLs (fetched with the
# key); nothing from another site, nothing inline.
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'none'"
)


def web_page(request: Request) -> FileResponse:
    """The web page (service/static/): jobs, live curves, pictures, interpolation, submit."""
    return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_CSP})


def create_app(settings: Settings, worker_process: bool = False) -> FastAPI:
    """The API. As one of several worker processes (service/api_workers.py), its metrics are
    kept in prometheus-client's multiprocess files and AETRAIN_METRICS_PORT is left to the
    supervisor, which serves the sum."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = connect(settings.require_redis_url())
        app.state.store = JobStore(client, settings.key_prefix, settings.retention_s)
        app.state.job_reads = reads = JobReads(settings.require_redis_url(), app.state.store.keys)
        app.state.storage = open_storage(settings.storage_root)
        app.state.event_hub = hub = EventHub(settings.require_redis_url(), app.state.store.keys)
        metrics.jobs.store = app.state.store
        await hub.start()
        try:
            if settings.metrics_port is not None and not worker_process:
                metrics.serve(settings.metrics_port, settings.metrics_host)
            yield
        finally:
            metrics.close()
            await hub.stop()
            await reads.close()
            client.close()

    app = FastAPI(title="aetrain", version="0.1.0", lifespan=lifespan,
                  generate_unique_id_function=operation_id,
                  dependencies=[Depends(bind_request_log_context)])  # fmt: skip
    app.state.settings = settings  # read per request by service.deps (auth on or off)
    install_error_handlers(app)
    app.add_middleware(RequestGuard, settings=settings)
    # Added last, so outermost: it times the requests RequestGuard refuses too.
    app.state.metrics = metrics = ApiMetrics(multiprocess=worker_process)
    app.add_middleware(RequestMetrics, histogram=metrics.requests)
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(events.router)
    app.include_router(logs.router)
    app.include_router(datasets.router)
    if settings.metrics_port is None:  # else served on its own port, without a key
        app.include_router(metrics_router)
    # Outside /v1, so served without a key: the page asks for one and sends it on each call.
    # A plain Starlette route: not an operation of the API (nor of its OpenAPI document).
    app.router.add_route("/", web_page, methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def app_from_environment() -> FastAPI:
    """The app each worker process of `aetrain api --workers N` builds for itself (uvicorn's
    factory): its settings and logging from the environment, as `aetrain api` set them.

    A worker dies with its supervisor: a killed `aetrain api` leaves no process behind that
    still serves its port.
    """
    import multiprocessing
    import os
    import signal

    from shared.logs import configure_logging
    from workers.processes import die_with_parent

    die_with_parent()
    supervisor = multiprocessing.parent_process()
    if supervisor is not None and os.getppid() != supervisor.pid:  # it died before the arming
        os.kill(os.getpid(), signal.SIGKILL)
    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)
    return create_app(settings, worker_process=True)

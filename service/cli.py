"""The `aetrain` command line: the embedded stack, the processes one by one, and a client
(aetrain.Client, the Python client users import)."""

import json
import os
import sys
import time
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from aetrain import ApiError, Client, Job, NotFound, SpecFileError
from aetrain.client import TERMINAL
from aetrain.spec_file import read_spec
from shared.settings import Settings

if TYPE_CHECKING:
    from shared.store import JobStore

app = typer.Typer(help="aetrain: train autoencoders as jobs.", no_args_is_help=True)
# soft_wrap: a long path or message stays on one line (rich wraps at 80 columns off a
# terminal, which broke `wrote <path>` in two for scripts reading it).
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

UrlOpt = Annotated[str, typer.Option("--url", envvar="AETRAIN_URL", help="API address")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the API's answer as JSON")]
DEFAULT_URL = "http://127.0.0.1:8000"


def _client(url: str) -> Client:
    return Client(url, api_key=os.environ.get("AETRAIN_API_KEY"))


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def print_json(data: Any) -> None:
    """JSON for programs: plain (no colours, no wrapping), one document."""
    typer.echo(json.dumps(data, indent=2))


@app.command()
def version(as_json: JsonOpt = False) -> None:
    """Print the version of aetrain installed here."""
    try:
        installed = package_version("aetrain")
    except PackageNotFoundError:  # run from a source tree that was never installed
        installed = "unknown"
    if as_json:
        print_json({"version": installed})
    else:
        typer.echo(f"aetrain {installed}")


# -- processes -----------------------------------------------------------------------------------
@app.command()
def up(
    host: Annotated[str, typer.Option(help="bind address of the API")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port of the API")] = 8000,
) -> None:
    """Run everything on this machine: Redis, local Ray, a dispatcher and the API."""
    from service.embedded import run_up

    settings = Settings()
    if os.environ.get("AETRAIN_AUTH", "off") == "off":
        warn_if_exposed(host)
    raise typer.Exit(run_up(settings, host, port))


def warn_if_exposed(host: str) -> None:
    """Auth off on an address others can reach: anyone there may run jobs. Say it loudly."""
    from service.guards import LOOPBACK_HOSTS, host_of

    if host_of(host) in LOOPBACK_HOSTS:
        return
    err.print(
        f"[bold red]WARNING:[/bold red] the API listens on {host} with auth OFF: anyone who can "
        "reach this address can submit jobs, read results and delete them. Set AETRAIN_AUTH=on "
        "and create keys with `aetrain keys create`. With auth off, only requests whose Host is "
        "a loopback name or listed in AETRAIN_ALLOWED_HOSTS are served.",
        highlight=False,
    )


@app.command()
def api(
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
    workers: Annotated[
        int | None,
        typer.Option(min=1, max=64, help="worker processes (default: AETRAIN_API_WORKERS, 1)"),
    ] = None,
) -> None:
    """Run the HTTP API alone (needs AETRAIN_REDIS_URL)."""
    # Multiprocess metrics only where --workers sets them up (service/api_workers.py): an
    # inherited folder would add a stranger's counts.
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    import uvicorn

    from service.app import create_app
    from shared.logs import configure_logging

    settings = Settings()
    if not settings.redis_url:
        raise _fail("AETRAIN_REDIS_URL is not set")
    if settings.auth == "off":
        warn_if_exposed(host)
    configure_logging(settings.log_format, settings.log_level)
    if (workers or settings.api_workers) > 1:
        from service.api_workers import serve_workers

        serve_workers(settings, host, port, workers or settings.api_workers)
        return
    # Open event streams would hold a shutdown until their jobs end: give them 5 s.
    # log_config=None: uvicorn's lines go through the handler above, not handlers of its own.
    uvicorn.run(create_app(settings), host=host, port=port, log_config=None,
                log_level=settings.log_level.lower(), timeout_graceful_shutdown=5)  # fmt: skip


@app.command()
def worker() -> None:
    """Run one dispatcher (needs AETRAIN_REDIS_URL; RAY_ADDRESS or a local Ray)."""
    from workers.main import run_worker

    run_worker(Settings())


# -- client --------------------------------------------------------------------------------------
def load_spec(path: Path) -> dict[str, Any]:
    try:
        return read_spec(path)
    except SpecFileError as exc:
        raise _fail(str(exc)) from None


@app.command()
def submit(
    spec_file: Annotated[Path, typer.Argument(help="job spec, YAML or JSON")],
    wait: Annotated[bool, typer.Option("--wait", help="follow the job to its end")] = False,
    idempotency_key: Annotated[str | None, typer.Option(help="makes a retried submit safe")] = None,
    url: UrlOpt = DEFAULT_URL,
) -> None:
    """Submit a job; prints its id (with --wait, a progress bar until it ends)."""
    client = _client(url)
    try:
        job = client.submit(load_spec(spec_file), idempotency_key=idempotency_key)
    except ApiError as exc:
        raise _fail(str(exc)) from None
    console.print(job["id"])
    if wait:
        try:
            final = follow(client, job)
        except ApiError as exc:  # the outages are waited out; this is a 404 or a 401
            raise _fail(str(exc)) from None
        show_job(final)
        if final["state"] != "succeeded":
            raise typer.Exit(1)


def follow(client: Client, job: Job) -> Job:
    """Wait for the job to end, with one progress bar per stage."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("epoch {task.completed:.0f}/{task.total:.0f}"),
        TextColumn("{task.fields[metrics]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err) as progress:
        bars = {
            stage["name"]: progress.add_task(
                stage["name"], total=stage.get("epochs") or 1, metrics=""
            )  # fmt: skip
            for stage in job["stages"]
        }

        def show(job: Job) -> None:
            for stage in job["stages"]:
                done = 0 if stage["epoch"] is None else stage["epoch"] + 1
                if stage["state"] == "succeeded":
                    done = stage.get("epochs") or done
                metrics = stage["metrics"]
                loss = metrics.get("val_mse", metrics.get("val_bce", metrics.get("val_loss")))
                shown = f"val {loss:.5f}" if loss is not None else ""
                progress.update(bars[stage["name"]], completed=done, metrics=shown,
                                description=f"{stage['name']} {stage['state']}")  # fmt: skip

        def retrying(exc: ApiError) -> None:
            progress.console.print(f"retrying: {exc}")

        return client.wait(job["id"], callback=show, on_retry=retrying)


def show_job(job: Job) -> None:
    table = Table(show_header=False, box=None)
    for key in (
        "id",
        "name",
        "kind",
        "state",
        "created_at",
        "started_at",
        "finished_at",
        "epoch",
        "attempts",
        "error",
    ):
        table.add_row(key, str(job.get(key)))
    for stage in job.get("stages", []):
        table.add_row(f"stage {stage['name']}", f"{stage['state']} (epoch {stage['epoch']})")
    for warning in job.get("warnings", []):
        table.add_row("warning", warning)
    if job.get("metrics"):
        table.add_row("latest", json.dumps(job["metrics"]))
    console.print(table)


@app.command()
def status(job_id: str, url: UrlOpt = DEFAULT_URL, as_json: JsonOpt = False) -> None:
    """Show a job's record (a failed job's with the end of its log)."""
    try:
        job = _client(url).get(job_id)
    except ApiError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        print_json(job)
        return
    show_job(job)
    if job.get("error_tail"):
        console.print("the end of the failing stage's log:", highlight=False)
        console.out(job["error_tail"], highlight=False)


@app.command("list")
def list_jobs(
    state: Annotated[
        str | None, typer.Option(help="queued|running|succeeded|failed|cancelled")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=200)] = 50,
    url: UrlOpt = DEFAULT_URL,
    as_json: JsonOpt = False,
) -> None:
    """List jobs, newest first."""
    try:
        page = _client(url).list(state, limit)
    except ApiError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        print_json(page)
        return
    table = Table("name", "state", "epoch", "created_at")
    table.add_column("id", no_wrap=True, min_width=21)
    for job in page["items"]:
        table.add_row(job["name"], job["state"], str(job["epoch"]), job["created_at"], job["id"])
    console.print(table)


@app.command()
def cancel(job_id: str, url: UrlOpt = DEFAULT_URL) -> None:
    """Cancel a queued or running job."""
    try:
        job = _client(url).cancel(job_id)
    except ApiError as exc:
        raise _fail(str(exc)) from None
    console.print(
        f"{job['id']}: {job['state']}" + (" (stopping)" if job.get("cancel_requested") else "")
    )


@app.command()
def delete(job_id: str, url: UrlOpt = DEFAULT_URL) -> None:
    """Delete a finished job: its record, metrics, artifacts, checkpoints and logs."""
    try:
        _client(url).delete(job_id)
    except ApiError as exc:
        raise _fail(str(exc)) from None
    console.print(f"{job_id}: deleted")


@app.command()
def result(job_id: str, url: UrlOpt = DEFAULT_URL, as_json: JsonOpt = False) -> None:
    """Print a finished job's final metrics and artifacts as JSON (--json: without colours)."""
    try:
        answer = _client(url).result(job_id)
    except ApiError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        print_json(answer)
    else:
        console.print_json(json.dumps(answer))


@app.command()
def artifacts(
    job_id: str,
    name: Annotated[str | None, typer.Argument(help="an artifact to download")] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="file or folder to write it to")
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    as_json: JsonOpt = False,
) -> None:
    """List a finished job's artifacts, or download one (to NAME's file name, or -o)."""
    client = _client(url)
    if name is None:
        try:
            names = client.result(job_id)["artifacts"]
        except ApiError as exc:
            raise _fail(str(exc)) from None
        if as_json:
            print_json(names)
        else:
            typer.echo("\n".join(names))
        return
    # Some names have folders (tensorboard/<stage>/...): the file goes here, not there.
    target = output or Path(Path(name).name)
    try:
        written = client.download(job_id, name, target)
    except ApiError as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"cannot write {target}: {exc.strerror}") from None
    if as_json:
        print_json({"name": name, "path": str(written), "size_bytes": written.stat().st_size})
    else:
        console.print(f"wrote {written} ({written.stat().st_size:,} bytes)", highlight=False)


@app.command()
def logs(
    job_id: str,
    follow: Annotated[
        bool, typer.Option("-f", "--follow", help="print new lines as they come, to the end")
    ] = False,
    stage: Annotated[
        str | None, typer.Option(help="a stage of the job (default: the one started last)")
    ] = None,
    url: UrlOpt = DEFAULT_URL,
) -> None:
    """Print a stage's log; with -f, follow it (waiting for the stage to start) to its end."""
    client = _client(url)
    try:
        if follow:
            follow_log(client, job_id, stage)
        else:
            sys.stdout.write(client.logs(job_id, stage))
    except ApiError as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def follow_log(client: Client, job_id: str, stage: str | None, poll_s: float = 1.0) -> None:
    """Write the stage's log to stdout as it grows; while the stage has not started, wait."""
    printed = waiting = False
    while True:
        try:
            for chunk in client.logs(job_id, stage, follow=True):
                printed = True
                sys.stdout.write(chunk)
                sys.stdout.flush()
            return
        except NotFound:
            if printed:  # it went away while followed (deleted)
                raise
            job = client.get(job_id)  # NotFound: no such job
            if job["state"] in TERMINAL or stage not in {None, *(s["name"] for s in
                                                                 job["stages"])}:  # fmt: skip
                raise
            if not waiting:
                err.print(f"{job_id} is {job['state']}: waiting for its stage to start",
                          highlight=False)  # fmt: skip
                waiting = True
            time.sleep(poll_s)


@app.command()
def pull(
    job_id: str,
    output: Annotated[Path, typer.Option("-o", "--output", help="file to write")],
    format: Annotated[str, typer.Option(help="torchscript, safetensors or onnx")] = "torchscript",
    url: UrlOpt = DEFAULT_URL,
) -> None:
    """Download a finished job's encoder."""
    try:
        written = _client(url).download_encoder(job_id, output, format)
    except ApiError as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"cannot write {output}: {exc.strerror}") from None
    console.print(f"wrote {written} ({written.stat().st_size:,} bytes, {format})")


# -- API keys (straight to Redis: whoever can reach Redis is an operator) -----------------------
keys_app = typer.Typer(help="API keys of tenants (needs Redis: AETRAIN_REDIS_URL or `aetrain up`).")
app.add_typer(keys_app, name="keys", no_args_is_help=True)


def _key_store() -> "JobStore":
    import redis

    from service.embedded import REDIS_URL_FILE, find_redis_url
    from shared.store import JobStore, connect

    settings = Settings()
    url = find_redis_url(settings)
    if url is None:
        raise _fail(
            f"no Redis: set AETRAIN_REDIS_URL, or run `aetrain up` (it writes "
            f"{settings.home / REDIS_URL_FILE}) in this folder or with the same AETRAIN_HOME"
        )
    store = JobStore(connect(url), settings.key_prefix)
    try:
        store.ping()
    except redis.RedisError as exc:
        raise _fail(f"cannot reach Redis at {url} ({exc}); is `aetrain up` running?") from None
    return store


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="tenant that owns the key and its jobs")],
    max_priority: Annotated[
        int, typer.Option(min=0, max=9, help="highest job priority the key may ask for")
    ] = 4,
) -> None:
    """Create an API key; prints it once, as the last line (only its hash is kept)."""
    store = _key_store()
    try:
        key_id, key = store.api_keys.create(tenant, max_priority)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    err.print(f"API key {key_id} of tenant {tenant!r}; it is shown only now:", highlight=False)
    typer.echo(key)  # plain echo: rich could wrap or colour the key


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="id from `aetrain keys list`")]) -> None:
    """Revoke an API key at once."""
    if not _key_store().api_keys.revoke(key_id):
        raise _fail(f"no live API key with id {key_id!r}")
    console.print(f"revoked {key_id}")


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option(help="only this tenant's keys")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List API keys (ids and tenants; a key itself is never stored)."""
    infos = _key_store().api_keys.list(tenant)
    if as_json:
        print_json(infos)
        return
    table = Table("id", "tenant", "max_priority", "created_at", "revoked_at")
    for info in infos:
        table.add_row(info["key_id"], info["tenant"], info["max_priority"], info["created_at"],
                      info["revoked_at"] or "")  # fmt: skip
    console.print(table)


# -- datasets ------------------------------------------------------------------------------------
datasets_app = typer.Typer(help="Your uploaded datasets: .npz (x, optional labels y) or .npy.")
app.add_typer(datasets_app, name="datasets", no_args_is_help=True)


@datasets_app.command("upload")
def datasets_upload(
    path: Annotated[Path, typer.Argument(help=".npz with x (and integer labels y), or .npy")],
    name: Annotated[str, typer.Option(help="a name to know it by")] = "",
    url: UrlOpt = DEFAULT_URL,
    as_json: JsonOpt = False,
) -> None:
    """Upload a dataset; prints its id, to name as a spec's data.dataset."""
    try:
        dataset = _client(url).upload(path, name)
    except ApiError as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"cannot read {path}: {exc.strerror}") from None
    if as_json:
        print_json(dataset)
    else:
        typer.echo(dataset["id"])


@datasets_app.command("list")
def datasets_list(url: UrlOpt = DEFAULT_URL, as_json: JsonOpt = False) -> None:
    """List your uploads, newest first, and the built-in datasets."""
    try:
        listing = _client(url).datasets()
    except ApiError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        print_json(listing)
        return
    table = Table("name", "shape", "dtype", "bytes", "created_at")
    table.add_column("id", no_wrap=True)
    for d in listing["items"]:
        table.add_row(d["name"], "x".join(map(str, d["shape"])), d["dtype"],
                      f"{d['size_bytes']:,}", d["created_at"], d["id"])  # fmt: skip
    console.print(table)
    console.print(f"built in: {', '.join(listing['builtin'])}", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

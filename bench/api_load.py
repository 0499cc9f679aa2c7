"""API load: submissions/s and status reads/s of a live `aetrain up`, and Ray Jobs beside it.

    .venv/bin/python bench/api_load.py [--seconds 10] [--clients 8] [--api-workers N]
        [--ray-python PATH] [--load-only]

Starts `aetrain up` (auth off, its own Redis and local Ray, AETRAIN_API_WORKERS one per core
unless --api-workers says otherwise) in a temporary home on 127.0.0.1, then, from this process
(8 keep-alive connections on asyncio streams, opened one after another):

1. submissions: `POST /v1/jobs` for a fixed time; requests/s, p50, p99. The dispatcher claims
   the jobs as they come and fails each at once (the spec asks for 64 workers x 64 CPUs, more
   than any cluster here has, so no training runs); what it has not claimed by the end is
   cancelled through the store.
2. status reads: `GET /v1/jobs/{id}` of those jobs for a fixed time; requests/s, p50, p99.
   With py-spy at hand (`--py-spy`), each phase also says where the API process's CPU went.
3. costs: a few hundred submits and reads through the same app in this process under
   cProfile (the app's thread-pool hops run inline so that one profile sees everything).
4. scale: the load's jobs are deleted, then finished jobs are written into the tenant (with
   their quota charges, as the API would have left them). With 10 and with 10,000, medians
   (and minimums) of 20: first pages of `GET /v1/jobs` (10 items, by state and not, and the
   default 50), `JobStore.claim` of a newly queued job (alone, and with 20 others running;
   the dispatcher is paused meanwhile so that the claim is ours), single submissions and the
   quota charge within them.
5. Ray Jobs: after `up` has stopped, a `ray start --head` with its dashboard in a temporary
   folder, and `JobSubmissionClient.submit_job("python -c pass")` from 8 threads for the same
   time. The dashboard needs `ray[default]`, which this project does not install: point
   `--ray-python` at the python of a venv that has it at our Ray version (`python -m venv
   /tmp/ray-default && /tmp/ray-default/bin/pip install "ray[default]==2.60.0"`); without
   one, this part says why it did not run.

Every figure depends on what else runs on the machine: the load average at the start and the
CPU each process used during each phase are printed with it. Nothing here asserts a speed.
"""

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stack import Stack, free_port, running_stack  # noqa: E402

from shared.errors import InvalidTransition, JobNotFound  # noqa: E402
from shared.jobs import JobRecord, JobState, advance, new_job_id  # noqa: E402
from shared.quotas import Quotas, estimate_job_bytes, job_item  # noqa: E402
from shared.specs import parse_job_spec  # noqa: E402
from shared.store import JobStore  # noqa: E402

TENANT = "default"  # the tenant of every request with auth off
# Tiny, and failed by the dispatcher as soon as it claims it: 4,096 CPUs fit no cluster here.
SPEC = {"kind": "autoencoder", "name": "load", "data": {"dataset": "digits"},
        "model": {"hidden": [8], "latent_dim": 2}, "training": {"epochs": 1},
        "resources": {"workers": 64, "cpus_per_worker": 64}}  # fmt: skip
LIMITS = {"AETRAIN_MAX_OPEN_JOBS": "1000000", "AETRAIN_MAX_SUBMISSIONS_PER_MINUTE": "1000000",
          "AETRAIN_STORAGE_QUOTA_BYTES": str(2**60)}  # fmt: skip
TARGETS = {"submit_rate": 500, "submit_p99_ms": 50, "read_rate": 2000}
ISSUE_SUBMIT_RATE = 122
ISSUE_BEFORE = "122 submissions/s (p50 60 ms, p99 149 ms), 286 reads/s (p50 27 ms); Ray Jobs ~19/s"
SAMPLES = 20  # per timing in the scale part


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def median(values: list[float]) -> float:
    return percentile(values, 0.5)


# -- processes and their CPU -------------------------------------------------------------------
def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def descendants(root: int) -> list[int]:
    parents = {int(p.name): parent_of(int(p.name)) for p in Path("/proc").iterdir()
               if p.name.isdigit()}  # fmt: skip
    found, frontier = [], [root]
    while frontier:
        kids = [pid for pid, parent in parents.items() if parent in frontier]
        found.extend(kids)
        frontier = kids
    return found


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


class CpuWatch:
    """Cores each group of processes (and this one) used while a phase ran."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups

    @contextmanager
    def phase(self) -> Iterator[dict[str, float]]:
        pids = {name: pick() for name, pick in self.groups.items()}
        before = {name: cpu_seconds(p) for name, p in pids.items()}
        mine, started = time.process_time(), time.monotonic()
        used: dict[str, float] = {}
        try:
            yield used
        finally:
            wall = time.monotonic() - started
            for name, p in pids.items():
                used[name] = (cpu_seconds(p) - before[name]) / wall
            used["clients (this process)"] = (time.process_time() - mine) / wall


def show_cpu(used: dict[str, float]) -> str:
    return "CPU cores used: " + ", ".join(f"{name} {cores:.2f}" for name, cores in used.items())


# -- the stack (bench/stack.py) -------------------------------------------------------------------
def cpu_watch(stack: Stack) -> CpuWatch:
    dispatcher = stack.pids["dispatcher"]
    return CpuWatch({
        "api": lambda: [stack.pids["api"], *descendants(stack.pids["api"])],
        "redis": lambda: [stack.pids["redis"]],
        "dispatcher + its Ray": lambda: [dispatcher, *descendants(dispatcher)],
    })  # fmt: skip


def api_worker(stack: Stack) -> int:
    """The process that serves requests: the API itself, or with several workers the first
    of them (py-spy samples one; the CPU figures count them all)."""
    workers = [pid for pid in descendants(stack.pids["api"])
               if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]  # fmt: skip
    return min(workers) if workers else stack.pids["api"]


@contextmanager
def dispatcher_paused(stack: Stack) -> Iterator[None]:
    """SIGSTOP the dispatcher, so that a claim made here is not raced by it."""
    dispatcher = stack.pids["dispatcher"]
    os.kill(dispatcher, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(dispatcher, signal.SIGCONT)


# -- timed load from N threads ------------------------------------------------------------------
@dataclass
class Phase:
    seconds: float
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)

    def line(self, what: str) -> str:
        return (f"{what}: {self.rate:,.0f}/s  p50 {percentile(self.latencies, 0.5) * 1000:.1f} ms  "
                f"p99 {percentile(self.latencies, 0.99) * 1000:.1f} ms  "
                f"({len(self.latencies):,} in {self.seconds:.0f} s; answers "
                f"{dict(self.statuses)})")  # fmt: skip

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds


class Connection:
    """One keep-alive HTTP/1.1 connection on asyncio streams: a request's bytes are built once,
    and a response is read as far as its status, Content-Length and body. A client this thin
    uses a few per cent of a core at thousands of requests a second, where a thread per
    `httpx.Client` used a third of a core at a few hundred: on 2 cores, what the clients burn
    is taken from the server they measure."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        self.writer.write(head.encode("ascii") + body)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status, length, close = int(status_line.split()[1]), 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        payload = await self.reader.readexactly(length)
        if close:
            self.close()
        return status, payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


Request = Callable[[Connection], Awaitable[str]]


def load(
    clients: int, seconds: float, url: str, request: Request, warmup_s: float = 1.0
) -> Phase:
    """`clients` keep-alive connections, each sending `request(connection)` back to back;
    requests started in the first `warmup_s` are not counted. `request` returns the answer's
    status (or the name of the exception that stopped it)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    phase = Phase(seconds)

    async def client(connection: Connection, counted_from: float, stop_at: float) -> None:
        try:
            while (started := time.perf_counter()) < stop_at:
                try:
                    status = await request(connection)
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    status = type(exc).__name__  # counted, not fatal: a bench goes on
                    connection.close()
                if started >= counted_from:
                    phase.statuses[status] += 1
                    if status in {"200", "201"}:
                        phase.latencies.append(time.perf_counter() - started)
        finally:
            connection.close()

    async def run() -> None:
        # Connected one after another, as clients arrive, not in one burst: several API
        # worker processes share the listening socket, and the first to wake takes every
        # connection waiting (asyncio accepts in a loop), so a burst of 8 went to one.
        connections = []
        for _ in range(clients):
            connection = Connection(host, int(port))
            await request(connection)
            connections.append(connection)
            await asyncio.sleep(0.05)
        counted_from = time.perf_counter() + warmup_s
        await asyncio.gather(*(client(c, counted_from, counted_from + seconds)
                               for c in connections))  # fmt: skip

    asyncio.run(run())
    return phase


def submit_load(stack: Stack, clients: int, seconds: float) -> tuple[Phase, list[str]]:
    ids: list[str] = []
    body = json.dumps(SPEC).encode()  # encoded once, not per request

    async def submit(connection: Connection) -> str:
        status, payload = await connection.request("POST", "/v1/jobs", body)
        if status == 201:
            ids.append(json.loads(payload)["id"])
        return str(status)

    return load(clients, seconds, stack.url, submit), ids


def read_load(stack: Stack, clients: int, seconds: float, ids: list[str]) -> Phase:
    pick = random.Random(0)

    async def read(connection: Connection) -> str:
        status, _ = await connection.request("GET", f"/v1/jobs/{pick.choice(ids)}")
        return str(status)

    return load(clients, seconds, stack.url, read)


def drain(store: JobStore, timeout_s: float = 60) -> tuple[int, int]:
    """Cancel what is still queued and wait for the dispatcher to end what it holds;
    (jobs the dispatcher had claimed and failed, jobs cancelled here)."""
    failed = store.redis.zcard(store.keys.state_index(TENANT, JobState.FAILED))
    cancelled = 0
    for job_id in store.queued_ids(TENANT):
        try:
            store.request_cancel(job_id)
            cancelled += 1
        except (InvalidTransition, JobNotFound):  # claimed meanwhile
            pass
    deadline = time.monotonic() + timeout_s
    while store.redis.scard(store.keys.active) and time.monotonic() < deadline:
        time.sleep(0.2)
    return int(failed), cancelled


# -- where the live API process spends its CPU (py-spy, optional) ------------------------------
# Samples of the thread holding the GIL, by the file of the innermost frame.
SPY_GROUPS = [
    ("HTTP parsing (h11, uvicorn)", ("h11/", "uvicorn/")),
    ("event loop (asyncio)", ("asyncio/", "selectors.py")),
    ("thread-pool hops (anyio, threading)", ("anyio/", "threading.py", "concurrent/", "queue.py")),
    ("redis-py", ("redis/",)),
    ("pydantic", ("pydantic",)),
    ("FastAPI + Starlette", ("fastapi/", "starlette/")),
    ("our code (service/, shared/)", ("service/", "shared/")),
    ("logging (the access log)", ("logging/",)),
]
SPY_WITHIN = [("the handler", ("submit_job (", "get_job (")), ("the event hub", ("EventHub._run",))]


@contextmanager
def spied(py_spy: str | None, pid: int, seconds: float) -> Iterator[list[str]]:
    """Record `pid` with py-spy while the block runs; the summary lands in the yielded list."""
    summary: list[str] = []
    if py_spy is None:
        yield summary
        return
    out = Path(tempfile.mkstemp(suffix=".txt")[1])
    spy = subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "--duration", str(round(seconds)), "--rate", "200",
         "--gil", "--nonblocking", "--format", "raw", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield summary
    finally:
        spy.wait(timeout=seconds + 60)
        summary.append(summarize_spy(out.read_text()))
        out.unlink()


def summarize_spy(raw: str) -> str:
    leaf, within, total = Counter[str](), Counter[str](), 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        total += int(count)
        innermost = stack.rsplit(";", 1)[-1]
        group = next((name for name, marks in SPY_GROUPS
                      if any(m in innermost for m in marks)), "other")  # fmt: skip
        leaf[group] += int(count)
        for name, marks in SPY_WITHIN:
            if any(m in stack for m in marks):
                within[name] += int(count)
    if not total:
        return "py-spy: no samples"
    parts = [f"{name} {100 * n / total:.0f}%" for name, n in leaf.most_common()]
    inside = ", ".join(f"{name} {100 * n / total:.0f}%" for name, n in within.items())
    return (
        f"py-spy, API's GIL holder, {total:,} samples: " + ", ".join(parts) + f"; inside {inside}"
    )


# -- where a request's time goes (in this process, under cProfile) ------------------------------
# (label, file suffix, function): cumulative time per request of each, from the profile; a
# label that starts with "-" is the row above less that function (the guard wraps the app).
COSTS = [
    ("the app, all of the server side", "fastapi/applications.py", "__call__"),
    ("request guard, with the app inside it", "service/guards.py", "__call__"),
    ("- the guard's own part", "starlette/middleware/exceptions.py", "__call__"),
    ("FastAPI: parse + validate the body, run dependencies", "fastapi/dependencies/utils.py",
     "solve_dependencies"),
    ("handler submit_job (all it calls)", "service/routes/jobs.py", "submit_job"),
    ("  JobRecord.for_spec (stage plan, warnings)", "shared/jobs.py", "for_spec"),
    ("  quota: estimate the job's bytes", "shared/quotas.py", "estimate_job_bytes"),
    ("  quota: charge (Lua over the tenant's ledger)", "shared/quotas.py", "charge"),
    ("  storage free bytes (statvfs)", "shared/storage.py", "free_bytes"),
    ("  JobStore.submit (one Lua script)", "shared/store.py", "submit"),
    ("handler get_job (all it calls)", "service/routes/jobs.py", "get_job"),
    ("  JobStore.get (GET + HGETALL, parse the record)", "shared/store.py", "get"),
    ("  JobRecord.model_validate_json", "pydantic/main.py", "model_validate_json"),
    ("FastAPI: validate + serialize the response", "fastapi/routing.py", "serialize_response"),
    ("waiting for Redis (socket reads, fsync included)", "redis/connection.py", "read_response"),
    ("event hub: reading the changes stream", "service/event_hub.py", "_read"),
]  # fmt: skip


def cumulative(stats: pstats.Stats, suffix: str, name: str) -> float:
    # pstats keeps its table in an undocumented attribute; fine for a bench.
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    return sum(row[3] for (path, _, func), row in table.items()
               if func == name and path.endswith(suffix))  # fmt: skip


def cost_lines(stats: pstats.Stats, count: int, wall: float) -> list[str]:
    lines, above = [], 0.0
    for label, suffix, name in COSTS:
        spent = cumulative(stats, suffix, name) / count
        if label.startswith("-"):
            spent = max(0.0, above - spent)
        above = spent
        if spent > 0:
            lines.append(f"    {label:55s} {spent * 1000:6.2f} ms {100 * spent / wall:4.0f}%")
    return lines


def profile_requests(stack: Stack, count: int) -> list[str]:
    """Submit and read `count` jobs through the app in this process; lines of what cost what."""
    import anyio.to_thread

    from service.app import create_app
    from shared.settings import Settings

    settings = Settings(home=stack.home, redis_url=stack.redis_url, auth="off",
                        max_open_jobs=10**6, max_submissions_per_minute=10**6,
                        storage_quota_bytes=2**60)  # fmt: skip
    app = create_app(settings)
    hops = Counter[str]()
    real_run_sync = anyio.to_thread.run_sync

    async def inline(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        hops[getattr(getattr(func, "func", func), "__name__", "?")] += 1  # a partial
        return func(*args)

    hop_s = asyncio.run(_thread_hop_seconds(real_run_sync))
    body = httpx.Request("POST", "/", json=SPEC).content
    headers = {"content-type": "application/json"}
    lines = []

    async def run() -> None:
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=transport, base_url="http://127.0.0.1"
        ) as http:  # fmt: skip
            for _ in range(30):  # warm: imports, pydantic's first validations, connections
                await http.post("/v1/jobs", content=body, headers=headers)
            for what in ("submit", "read"):
                ids: list[str] = []
                hops.clear()
                profile = cProfile.Profile()
                started = time.perf_counter()
                profile.enable()
                for i in range(count):
                    if what == "submit":
                        reply = await http.post("/v1/jobs", content=body, headers=headers)
                        ids.append(reply.json()["id"])
                    else:
                        await http.get(f"/v1/jobs/{submitted[i % len(submitted)]}")
                profile.disable()
                wall = (time.perf_counter() - started) / count
                submitted[:] = ids or submitted
                stats = pstats.Stats(profile)
                lines.append(f"{what}: {wall * 1000:.2f} ms a request in this process under "
                             f"cProfile (its overhead included); "
                             f"{sum(hops.values()) / count:.0f} thread-pool hops a request (run "
                             f"inline here; in uvicorn each costs ~{hop_s * 1e6:.0f} us on an "
                             f"idle event loop): {', '.join(hops) or 'none'}")  # fmt: skip
                lines.extend(cost_lines(stats, count, wall))

    submitted: list[str] = []
    anyio.to_thread.run_sync = inline  # type: ignore[assignment]
    try:
        asyncio.run(run())
    finally:
        anyio.to_thread.run_sync = real_run_sync
    return lines


async def _thread_hop_seconds(run_sync: Callable[..., Any], n: int = 2000) -> float:
    """What one `run_in_threadpool` of a no-op costs on an idle event loop."""
    started = time.perf_counter()
    for _ in range(n):
        await run_sync(int)
    return (time.perf_counter() - started) / n


# -- scale: 10 vs 10,000 jobs in the tenant -------------------------------------------------------
def delete_tenant_jobs(store: JobStore) -> int:
    """Delete every (finished) job of the tenant and its quota charge; returns how many."""
    ids = store.redis.zrange(store.keys.index(TENANT), 0, -1)
    for job_id in ids:
        try:
            store.delete(job_id)
        except (InvalidTransition, JobNotFound):
            pass
    Quotas(store.redis, store.keys).release(TENANT, *(job_item(i) for i in ids))
    return len(ids)


def seed_finished(store: JobStore, count: int, batch: int = 1000) -> None:
    """Write `count` succeeded jobs as submit + claim + finish would leave them, pipelined."""
    spec = parse_job_spec(SPEC)
    template = advance(advance(JobRecord.for_spec(spec, TENANT), JobState.RUNNING),
                       JobState.SUCCEEDED)  # fmt: skip
    nbytes = estimate_job_bytes(spec)
    keys = store.keys
    for start in range(0, count, batch):
        pipe = store.redis.pipeline(transaction=False)
        for _ in range(min(batch, count - start)):
            job = template.model_copy(update={"id": new_job_id()})
            # The same writes as a finish (JobStore._write), plus what the submit and the
            # API's quota charge leave behind: the tenant index and the ledger entry.
            store._write(pipe, job)
            pipe.zadd(keys.index(TENANT), {job.id: 0})
            pipe.sadd(keys.tenants, TENANT)
            pipe.hset(keys.quota(TENANT), job_item(job.id), nbytes)
        pipe.execute()


def settle(stack: Stack, timeout_s: float = 120) -> float:
    """Wait until the API is idle again (its event hub reads every change written, the
    seeding's too) and Redis is not rewriting its AOF; returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        before = cpu_seconds([stack.pids["api"]])
        time.sleep(0.5)
        busy = (cpu_seconds([stack.pids["api"]]) - before) / 0.5
        if busy < 0.1 and not stack.store.redis.info("persistence")["aof_rewrite_in_progress"]:
            break
    return time.monotonic() - started


def time_scale(stack: Stack, http: httpx.Client) -> dict[str, tuple[list[float], int | None]]:
    """Timings (seconds) of a claim, the list pages and a single submission, as it stands;
    with the items on the page where there is one."""
    store, spec = stack.store, parse_job_spec(SPEC)

    def claim_one() -> Any:
        store.submit(JobRecord.for_spec(spec, TENANT))
        started = time.perf_counter()
        claim = store.claim("api-load-bench", lease_ttl_s=600, block_ms=0)
        if claim is None:
            raise RuntimeError("no claim of a queued job while the dispatcher was paused")
        return claim, time.perf_counter() - started

    quotas, nbytes = Quotas(store.redis, store.keys, 2**60), estimate_job_bytes(spec)
    claim_s, busy_claim_s, charge_s = [], [], []
    with dispatcher_paused(stack):
        for _ in range(SAMPLES):  # with no other job running, as an idle dispatcher claims
            claim, seconds = claim_one()
            claim_s.append(seconds)
            store.finish(claim, JobState.FAILED, error="claimed by bench/api_load.py")
        held = [claim_one()[0] for _ in range(SAMPLES)]  # running: the running page lists them
        for _ in range(SAMPLES):
            claim, seconds = claim_one()
            busy_claim_s.append(seconds)
            store.finish(claim, JobState.FAILED, error="claimed by bench/api_load.py")
    for _ in range(SAMPLES):
        item = job_item(new_job_id())
        started = time.perf_counter()
        quotas.charge(TENANT, item, nbytes)
        charge_s.append(time.perf_counter() - started)
        quotas.release(TENANT, item)
    timings: dict[str, tuple[list[float], int | None]] = {
        "JobStore.claim of a newly queued job": (claim_s, None),
        f"  the same, {SAMPLES} other jobs running": (busy_claim_s, None),
    }
    # Pages of 10 compare like with like (with 10 jobs, the first page holds 10); the default
    # page of 50 (a 60 KB answer) is timed apart, after them.
    for queries in (
        ("state=running", "state=succeeded&limit=10", "limit=10"),
        ("state=succeeded",),
    ):
        pages: dict[str, list[float]] = {query: [] for query in queries}
        items: dict[str, int] = {}
        for _ in range(SAMPLES):  # in turn, so that a slow moment of the machine hits all
            for query in queries:
                started = time.perf_counter()
                reply = http.get(f"/v1/jobs?{query}").raise_for_status()
                pages[query].append(time.perf_counter() - started)
                items[query] = len(reply.json()["items"])
        for query in queries:
            timings[f"GET /v1/jobs?{query}"] = (pages[query], items[query])
    samples = []
    for _ in range(SAMPLES):
        started = time.perf_counter()
        http.post("/v1/jobs", json=SPEC).raise_for_status()
        samples.append(time.perf_counter() - started)
    timings["POST /v1/jobs, one at a time"] = (samples, None)
    timings["  of it: the quota charge (Quotas.charge)"] = (charge_s, None)
    for claim in held:  # else the dispatcher would take them over once their lease ran out
        store.finish(claim, JobState.FAILED, error="claimed by bench/api_load.py")
    return timings


def _cell(seconds: list[float], items: int | None) -> str:
    # The minimum beside the median: on this 2-core VM one page's latency was bimodal (about
    # 10 or 17 ms for 50 items, with 60 or 10,000 jobs in Redis alike), so a median of 20 alone
    # can move 1.7x from one run to the next.
    page = f" [{items:>2}]" if items is not None else "     "
    return f"{median(seconds) * 1000:6.2f} ({min(seconds) * 1000:5.2f}){page}"


# -- Ray Jobs -------------------------------------------------------------------------------------
# Runs under --ray-python (JobSubmissionClient needs ray[default], which our venv lacks):
# ADDRESS CLIENTS SECONDS -> JSON {latencies, errors, states}. The first second is warm-up.
_RAY_JOBS_LOAD = """
import json, sys, threading, time
from collections import Counter
from ray.job_submission import JobSubmissionClient

address, clients, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
sdks = [JobSubmissionClient(address) for _ in range(clients)]
latencies, errors, lock = [], Counter(), threading.Lock()
counted_from = time.perf_counter() + 1.0
stop_at = counted_from + seconds

def submit(sdk):
    while (started := time.perf_counter()) < stop_at:
        try:
            sdk.submit_job(entrypoint="python -c pass")
        except Exception as exc:
            with lock:
                errors[type(exc).__name__] += 1
            continue
        if started >= counted_from:
            with lock:
                latencies.append(time.perf_counter() - started)

threads = [threading.Thread(target=submit, args=(sdk,)) for sdk in sdks]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
states = Counter(str(job.status) for job in sdks[0].list_jobs())
print(json.dumps({"latencies": latencies, "errors": errors, "states": states}))
"""


def ray_jobs(ray_python: str, clients: int, seconds: float) -> tuple[list[str], float | None]:
    """Submissions/s of Ray's JobSubmissionClient against a fresh head with its dashboard."""
    ray_cli = Path(ray_python).parent / "ray"
    needs = "import aiohttp, aiohttp_cors, opencensus, ray.job_submission"
    if not ray_cli.exists() or subprocess.run([ray_python, "-c", needs],
                                              capture_output=True).returncode:  # fmt: skip
        why = (f"Ray's dashboard and its job SDK need ray[default], which {ray_python} lacks "
               "(or it has no `ray` command beside it); pass --ray-python with the python of a "
               "venv that has ray[default] at our Ray version")  # fmt: skip
        return [f"Ray Jobs: not run: {why}"], None
    temp = Path(tempfile.mkdtemp(prefix="ray-jobs-", dir="/tmp"))  # short: Ray's socket paths
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}  # as our Ray runs
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dashboard,
             "--ray-client-server-port": free_port(), "--node-manager-port": free_port(),
             "--object-manager-port": free_port(), "--dashboard-agent-listen-port": free_port(),
             "--dashboard-agent-grpc-port": free_port(), "--runtime-env-agent-port": free_port(),
             "--metrics-export-port": free_port()}  # fmt: skip
    args = [str(ray_cli), "start", "--head", "--block", "--num-cpus=2",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            "--node-ip-address=127.0.0.1", f"--temp-dir={temp}", "--disable-usage-stats",
            *(f"{flag}={port}" for flag, port in ports.items())]  # fmt: skip
    log_path = temp / "ray-start.log"
    with open(log_path, "wb") as log:
        head = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        started, deadline = time.monotonic(), time.monotonic() + 180
        while not _answers(f"{address}/api/version", token):
            if head.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-600:]
                return [f"Ray Jobs: not run: the dashboard did not answer; ray start said: "
                        f"{tail}"], None  # fmt: skip
            time.sleep(1.0)
        ready_s = time.monotonic() - started
        run = subprocess.run([ray_python, "-c", _RAY_JOBS_LOAD, address, str(clients),
                              str(seconds)], env=env, capture_output=True, text=True,
                             timeout=seconds + 300)  # fmt: skip
        if run.returncode:
            return [f"Ray Jobs: the load failed: {run.stderr[-600:]}"], None
        reply = json.loads(run.stdout.strip().splitlines()[-1])
        phase = Phase(seconds, reply["latencies"], Counter({"ok": len(reply["latencies"])}))
        phase.statuses.update(reply["errors"])
        return [
            f"Ray Jobs (dashboard up in {ready_s:.0f} s): "
            + phase.line(f"JobSubmissionClient.submit_job, {clients} clients"),
            f"    job states right after: {reply['states']}",
        ], phase.rate
    finally:
        stop_ray_head(head)
        shutil.rmtree(temp, ignore_errors=True)


def _answers(url: str, token: str) -> bool:
    try:
        httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=2)
        return True
    except httpx.TransportError:
        return False


def stop_ray_head(head: subprocess.Popen[bytes]) -> None:
    """SIGTERM `ray start --block` (it stops what it started), then kill what is left of it."""
    session = head.pid  # start_new_session: the processes it started carry its session id
    head.terminate()
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()
    time.sleep(2)
    for pid in [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]:
        try:
            if os.getsid(pid) == session:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# -- main -----------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per phase")
    parser.add_argument("--clients", type=int, default=8, help="client threads")
    parser.add_argument("--profile-requests", type=int, default=300)
    parser.add_argument("--seed", type=int, default=10_000, help="finished jobs for the scale part")
    parser.add_argument(
        "--ray-python",
        default=sys.executable,
        help="python of a venv with ray[default] (Ray's dashboard)",
    )
    parser.add_argument(
        "--py-spy",
        help="py-spy to profile the API during the load (default: on PATH or beside "
        "--ray-python; 'none' to skip)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary home")
    parser.add_argument("--api-workers", type=int, default=min(len(os.sched_getaffinity(0)), 64),
                        help="AETRAIN_API_WORKERS of the stack (default: one per usable core)")
    parser.add_argument("--load-only", action="store_true",
                        help="only the two load phases: no profile, scale or Ray Jobs part")
    args = parser.parse_args()
    if args.py_spy is None:
        beside = Path(args.ray_python).parent / "py-spy"
        args.py_spy = shutil.which("py-spy") or (str(beside) if beside.exists() else None)
    elif args.py_spy == "none":
        args.py_spy = None
    load1, _, _ = os.getloadavg()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}  {os.cpu_count()} cores, load average {load1:.2f} "
        "at the start (the machine may be shared with other work: figures vary)"
    )
    print(f"the issue's 'before': {ISSUE_BEFORE}")
    # Auth off, the per-tenant limits out of the way.
    env = {**LIMITS, "AETRAIN_API_WORKERS": str(args.api_workers)}
    with running_stack(env=env, keep=args.keep, prefix="aetrain-load-") as stack:
        print(f"aetrain up (auth off, {args.api_workers} API worker process(es)) in "
              f"{stack.home}", flush=True)  # fmt: skip
        submit_rate = run_stack_parts(stack, args)
    if args.load_only:
        return
    print(
        "\nRay Jobs: a `ray start --head` with its dashboard, after `aetrain up` stopped",
        flush=True,
    )
    lines, ray_rate = ray_jobs(args.ray_python, args.clients, args.seconds)
    for line in lines:
        print(line, flush=True)
    ratios = f"submissions/s: {submit_rate / ISSUE_SUBMIT_RATE:.1f}x the issue's before"
    if ray_rate:
        ratios += f", {submit_rate / ray_rate:.1f}x Ray Jobs'"
    print(ratios)


def run_stack_parts(stack: Stack, args: argparse.Namespace) -> float:
    """Every part that needs the stack; returns the submissions/s."""
    watch, api = cpu_watch(stack), api_worker(stack)
    with watch.phase() as cpu, spied(args.py_spy, api, args.seconds) as spy:
        submits, ids = submit_load(stack, args.clients, args.seconds)
    print(submits.line(f"POST /v1/jobs, {args.clients} clients"))
    print("    " + show_cpu(cpu))
    for line in spy:
        print("    " + line)
    claimed, cancelled = drain(stack.store)
    print(
        f"    the dispatcher claimed and failed {claimed:,} of the {len(ids):,} submitted "
        f"(warm-up included); {cancelled:,} were still queued and were cancelled",
        flush=True,
    )
    with watch.phase() as cpu, spied(args.py_spy, api, args.seconds) as spy:
        reads = read_load(stack, args.clients, args.seconds, ids[-1000:])
    print(reads.line(f"GET /v1/jobs/{{id}}, {args.clients} clients"))
    print("    " + show_cpu(cpu), flush=True)
    for line in spy:
        print("    " + line)
    met = {
        f"submissions >= {TARGETS['submit_rate']}/s": submits.rate >= TARGETS["submit_rate"],
        f"submit p99 < {TARGETS['submit_p99_ms']} ms":
            percentile(submits.latencies, 0.99) * 1000 < TARGETS["submit_p99_ms"],
        f"reads >= {TARGETS['read_rate']:,}/s": reads.rate >= TARGETS["read_rate"],
    }  # fmt: skip
    print("targets: " + "; ".join(f"{k}: {'met' if ok else 'not met'}" for k, ok in met.items()))
    if args.load_only:
        return submits.rate

    print(f"\nwhere the time goes ({args.profile_requests} requests each, one at a time):")
    for line in profile_requests(stack, args.profile_requests):
        print(line)
    drain(stack.store)

    deleted = delete_tenant_jobs(stack.store)
    print(f"\nscale: deleted the {deleted:,} jobs above; medians of {SAMPLES}", flush=True)
    results: dict[int, dict[str, tuple[list[float], int | None]]] = {}
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        for total in (10, args.seed):
            finished = stack.store.redis.zcard(stack.store.keys.index(TENANT))
            started = time.perf_counter()
            seed_finished(stack.store, max(0, total - finished))
            seeded_s = time.perf_counter() - started
            drain(stack.store)
            settled_s = settle(stack)
            results[total] = time_scale(stack, http)
            print(f"    {total:,} finished jobs in the tenant (seeded in {seeded_s:.1f} s; the "
                  f"API was idle again {settled_s:.1f} s later)", flush=True)  # fmt: skip
            drain(stack.store)
    print(f"    {'median (min) ms, [items on the page]':42s} {'with 10':>20s} "
          f"{f'with {args.seed:,}':>20s} {'ratio':>6s}")  # fmt: skip
    for label, (small, small_items) in results[10].items():
        large, large_items = results[args.seed][label]
        print(f"    {label:42s} {_cell(small, small_items)} {_cell(large, large_items)} "
              f"{median(large) / median(small):6.2f}")  # fmt: skip
    print(f"    (the 10 and {args.seed:,} are succeeded jobs; {SAMPLES} more are running while "
          "the pages are read)")  # fmt: skip
    return submits.rate


if __name__ == "__main__":
    main()

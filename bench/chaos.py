"""Chaos: SIGKILL dispatchers and Ray Train workers under load, then check what must hold.

    .venv/bin/python bench/chaos.py [--jobs 30] [--kills 6] [--seed 0] [--timeout 3600]

Starts, in a temp dir, a private redis-server (appendonly yes, appendfsync always), a local
Ray (in this process), two dispatcher processes (`python -m workers`, lease TTL 3 s) and the
HTTP app (FastAPI TestClient, auth off). Submits N small digits autoencoders over HTTP (60-200
epochs, checkpoints every 10-20, 1 worker, max_failures 1), and while they run SIGKILLs, at
seeded random moments, a mix of dispatcher processes (a replacement is started at once, so
there are two again) and Ray Train worker processes (`RayTrainWorker`, of this Ray only). A
worker of a given run is killed at most `max_failures` times, so every job can succeed.

Then it waits until every job is terminal (or --timeout) and checks:

- lost: a job that got a 201 and whose record is gone;
- stuck: a job not terminal at the end;
- duplicate_runs: jobs with two live runs at once, seen in the metrics stream (each fencing
  token's entries must lie after the previous token's last entry, and none may come after the
  job ended), a terminal state that changed, or a succeeded job whose `metrics.jsonl` does not
  have each epoch exactly once;
- failed jobs: a failure within the fault budget (a Ray worker killed at most `max_failures`
  times in one run, a dispatcher lost at most `max_takeovers` times) is a bug and is printed
  on an `UNEXPECTED FAILURE` line;
- max_recovery_s: per kill, the time until each job it hit made progress again (a worker kill:
  an epoch from the restarted worker group; a dispatcher kill: an epoch under a new fencing
  token), or ended; the max over kills.

Beside the stream it watches the live RayTrainWorker processes (mapped to job and token
through the stage logs) and prints SUSPICIOUS lines for a job with workers of two tokens alive
at once, a worker alive 2 lease TTLs after its run was superseded, or a dispatcher that died
by itself.

The last line is `jobs=N kills=K lost=L duplicate_runs=D stuck=S max_recovery_s=T`. The exit
code is 1 when lost, duplicate_runs, stuck or the unexpected failures are nonzero. Every process
it started is stopped at the end, also on Ctrl-C or an error; the temp dir is removed unless
something was found (then its path is printed, with the dispatcher and stage logs) or --keep.
"""

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ray  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from service.app import create_app  # noqa: E402
from shared.errors import JobNotFound  # noqa: E402
from shared.jobs import JobRecord, is_terminal  # noqa: E402
from shared.settings import Settings  # noqa: E402
from shared.store import DEFAULT_MAX_TAKEOVERS, JobStore, connect  # noqa: E402
from tests.conftest import free_port, wait_for_ping  # noqa: E402

LEASE_TTL_S = 3.0
MAX_FAILURES = 1
POLL_S = 0.5
FIRST_KILL_S = (3.0, 15.0)  # after the first epoch of any job
KILL_GAP_S = (10.0, 50.0)  # between kills, so that they spread over the run
# An entry this soon after a worker kill cannot come from a restarted worker group (Ray takes
# seconds to start one); it is a write of the killed process that was already on its way.
IN_FLIGHT_MS = 250
CLAIM_LINE = re.compile(r"job (\S+): attempt \d+ \(token (\d+)\)")
WORKER_LINE = re.compile(r"RayTrainWorker pid=(\d+)\)")
ATTEMPT_LOG = re.compile(r"(.+)-attempt-(\d+)\.log$")


def stream_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def iso_ms(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1000)


def job_spec(index: int, rng: random.Random) -> dict[str, Any]:
    return {
        "kind": "autoencoder",
        "name": f"chaos-{index:02d}",
        "data": {"dataset": "digits", "validation_fraction": 0.2, "seed": index % 5},
        "model": {"arch": "dense", "hidden": rng.choice([[64], [128], [128, 64]]),
                  "latent_dim": rng.choice([8, 16]), "activation": "relu"},
        "objective": {"loss": "mse"},
        "training": {"epochs": rng.randint(60, 200), "batch_size": rng.choice([32, 64]),
                     "lr": 0.001, "seed": index, "checkpoint_every": rng.choice([10, 15, 20])},
        "resources": {"workers": 1, "max_failures": MAX_FAILURES},
    }  # fmt: skip


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process on the machine."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True)
    table: dict[int, tuple[int, str]] = {}
    for line in out.stdout.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2:
            table[int(parts[0])] = (int(parts[1]), parts[2] if len(parts) == 3 else "")
    return table


def descendants(root: int, table: dict[int, tuple[int, str]]) -> set[int]:
    children: dict[int, list[int]] = defaultdict(list)
    for pid, (parent, _) in table.items():
        children[parent].append(pid)
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


@dataclass
class DispatcherProc:
    name: str
    process: "subprocess.Popen[bytes]"
    log: Path
    started_at: float

    def claims(self) -> set[tuple[str, int]]:
        """(job, token) of every claim this dispatcher logged."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return set()
        return {(m.group(1), int(m.group(2))) for m in CLAIM_LINE.finditer(text)}


@dataclass
class Kill:
    number: int
    kind: str  # "dispatcher" or "worker"
    target: str
    at: float  # time.time()
    jobs: dict[str, int]  # job -> its fencing token at the kill
    last_epoch: dict[str, int | None]
    recovery: dict[str, float | None] = field(default_factory=dict)
    how: dict[str, str] = field(default_factory=dict)


@dataclass
class JobWatch:
    job_id: str
    epochs: int
    record: JobRecord | None = None
    missing: bool = False
    states: list[str] = field(default_factory=list)
    entries: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    last_id: str = "-"
    leases: list[tuple[float, int]] = field(default_factory=list)  # (first seen, token)

    @property
    def terminal(self) -> bool:
        return self.record is not None and is_terminal(self.record.state)

    def last_entry_ms(self) -> int | None:
        return stream_key(self.entries[-1][0])[0] if self.entries else None


class Chaos:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.workdir = Path(tempfile.mkdtemp(prefix="aetrain-chaos-"))
        self.storage_root = self.workdir / "storage"
        self.redis_proc: subprocess.Popen[bytes] | None = None
        self.ray_started = False
        self.dispatchers: list[DispatcherProc] = []
        self.retired: list[DispatcherProc] = []
        self.crashed: list[str] = []
        self.dispatcher_count = 0
        self.env: dict[str, str] = {}
        self.store: JobStore | None = None
        self.jobs: dict[str, JobWatch] = {}
        self.kills: list[Kill] = []
        self.worker_kills_per_run: dict[tuple[str, int], int] = defaultdict(int)
        self.worker_of: dict[int, tuple[str, int]] = {}  # RayTrainWorker pid -> (job, token)
        self.overlaps: dict[str, tuple[float, float, set[int]]] = {}  # job -> first, last, tokens
        self.stale_workers: dict[int, tuple[str, int, float, float]] = {}
        self.submit_errors: list[str] = []
        self.t0 = time.time()
        self.findings = False

    # -- the stack ------------------------------------------------------------------------------
    def start(self) -> None:
        port = free_port()
        redis_dir = self.workdir / "redis"
        redis_dir.mkdir()
        self.redis_proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(redis_dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        redis_url = wait_for_ping(f"redis://127.0.0.1:{port}/0")
        self.store = JobStore(connect(redis_url))
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        self.ray_started = True
        signal.signal(signal.SIGTERM, on_term)  # ray.init put its own (sys.exit) in place
        gcs = ray.get_runtime_context().gcs_address
        env = {k: v for k, v in os.environ.items()
               if k not in {"AETRAIN_DISPATCHER_SLOTS", "AETRAIN_FAULT_PAUSE"}}  # fmt: skip
        self.env = {**env, "AETRAIN_REDIS_URL": redis_url,
                    "AETRAIN_STORAGE": str(self.storage_root), "RAY_ADDRESS": gcs,
                    "RAY_AUTH_MODE": "token", "AETRAIN_LEASE_TTL_S": str(LEASE_TTL_S),
                    "PYTHONUNBUFFERED": "1"}  # fmt: skip
        self.settings = Settings(home=self.workdir / "home", storage=str(self.storage_root),
                                 redis_url=redis_url, auth="off")  # fmt: skip
        for _ in range(2):
            self.start_dispatcher()
        self.say(f"stack: redis :{port} (aof always), ray {gcs}, dispatchers "
                 f"{', '.join(f'{d.name} pid {d.process.pid}' for d in self.dispatchers)}, "
                 f"workdir {self.workdir}")  # fmt: skip

    def start_dispatcher(self) -> DispatcherProc:
        self.dispatcher_count += 1
        name = f"d{self.dispatcher_count}"
        log_path = self.workdir / "logs" / f"dispatcher-{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "workers"], env=self.env, cwd=REPO,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        proc = DispatcherProc(name, process, log_path, time.time())
        self.dispatchers.append(proc)
        return proc

    def stop(self) -> None:
        """Stop everything this bench started; safe to call more than once, after any error."""
        for proc in [*self.dispatchers, *self.retired]:
            if proc.process.poll() is None:
                proc.process.terminate()
        deadline = time.monotonic() + 20
        for proc in [*self.dispatchers, *self.retired]:
            try:
                proc.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.process.kill()
                proc.process.wait()
        self.dispatchers, self.retired = [], []
        if self.ray_started:
            ray.shutdown()
            self.ray_started = False
        if self.redis_proc is not None and self.redis_proc.poll() is None:
            self.redis_proc.terminate()
            try:
                self.redis_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.redis_proc.kill()
                self.redis_proc.wait()
        self.redis_proc = None

    def say(self, line: str) -> None:
        print(f"[{time.time() - self.t0:7.1f}s] {line}", flush=True)

    # -- keys of the store's layout the bench reads directly (shared/store.py) --------------------
    def lease_tokens(self, job_ids: list[str]) -> dict[str, int | None]:
        assert self.store is not None
        keys = [f"{self.store.prefix}:lease:{job_id}" for job_id in job_ids]
        values = self.store.redis.mget(keys) if keys else []
        return {
            j: (int(v) if v is not None else None) for j, v in zip(job_ids, values, strict=True)
        }

    # -- watching -------------------------------------------------------------------------------
    def submit(self, client: TestClient) -> None:
        for index in range(self.args.jobs):
            spec = job_spec(index, self.rng)
            headers = {"Idempotency-Key": f"chaos-{self.args.seed}-{index}"}
            response = client.post("/v1/jobs", json=spec, headers=headers)
            if response.status_code != 201:
                self.submit_errors.append(f"job {index}: {response.status_code} {response.text}")
                continue
            job_id = response.json()["id"]
            self.jobs[job_id] = JobWatch(job_id, spec["training"]["epochs"])
        self.say(f"submitted {len(self.jobs)} jobs (201), {len(self.submit_errors)} refused")

    def poll(self) -> None:
        assert self.store is not None
        for watch in self.jobs.values():
            try:
                record = self.store.get(watch.job_id)
            except JobNotFound:
                watch.missing = True
                continue
            watch.missing = False
            if not watch.states or watch.states[-1] != record.state.value:
                watch.states.append(record.state.value)
            watch.record = record
            while True:
                batch = self.store.metrics_after(watch.job_id, watch.last_id)
                if not batch:
                    break
                watch.entries.extend(batch)
                watch.last_id = batch[-1][0]
        now = time.time()
        open_jobs = [w.job_id for w in self.jobs.values() if not w.terminal]
        for job_id, token in self.lease_tokens(open_jobs).items():
            watch = self.jobs[job_id]
            if token is not None and (not watch.leases or watch.leases[-1][1] != token):
                watch.leases.append((now, token))
        self.watch_workers()

    def watch_workers(self) -> None:
        """Map live RayTrainWorker processes of this Ray to (job, token) through the stage logs,
        and note a job with live workers of two runs at once, or a worker outliving its run."""
        table = process_table()
        mine = descendants(os.getpid(), table)
        live = [pid for pid in mine if "RayTrainWorker" in table[pid][1]]
        if any(pid not in self.worker_of for pid in live):
            self.map_workers()
        now = time.time()
        by_job: dict[str, set[int]] = defaultdict(set)
        mapped = [(pid, self.worker_of[pid]) for pid in live if pid in self.worker_of]
        leases = self.lease_tokens(sorted({job for _, (job, _) in mapped}))
        for pid, (job_id, token) in mapped:
            by_job[job_id].add(token)
            watch = self.jobs.get(job_id)
            current = leases.get(job_id)
            if (watch is not None and watch.terminal) or (current is not None and current > token):
                first = self.stale_workers.get(pid, (job_id, token, now, now))[2]
                self.stale_workers[pid] = (job_id, token, first, now)
        for job_id, tokens in by_job.items():
            if len(tokens) > 1:
                first, _, seen = self.overlaps.get(job_id, (now, now, set()))
                self.overlaps[job_id] = (first, now, seen | tokens)

    def map_workers(self) -> None:
        for log in self.storage_root.glob("jobs/*/logs/*-attempt-*.log"):
            match = ATTEMPT_LOG.match(log.name)
            if match is None:
                continue
            job_id, token = log.parent.parent.name, int(match.group(2))
            try:
                text = log.read_text(errors="replace")
            except OSError:
                continue
            for pid in WORKER_LINE.findall(text):
                self.worker_of.setdefault(int(pid), (job_id, token))

    # -- killing --------------------------------------------------------------------------------
    def training_recently(self, job_id: str, token: int | None = None) -> bool:
        watch = self.jobs[job_id]
        if not watch.entries or watch.terminal:
            return False
        entry_id, entry = watch.entries[-1]
        fresh = time.time() * 1000 - stream_key(entry_id)[0] < 3000
        return fresh and (token is None or entry["token"] == token)

    def held_jobs(self, proc: DispatcherProc) -> dict[str, int]:
        """Jobs whose live lease is one this dispatcher took (from its log)."""
        claims = proc.claims()
        leases = self.lease_tokens(sorted({job for job, _ in claims if job in self.jobs}))
        return {job: token for job, token in claims
                if leases.get(job) == token and not self.jobs[job].terminal}  # fmt: skip

    def kill_dispatcher(self, number: int, patient: bool) -> Kill | None:
        candidates = []
        for proc in self.dispatchers:
            if proc.process.poll() is not None:
                continue
            held = self.held_jobs(proc)
            if held and (patient or any(self.training_recently(j, t) for j, t in held.items())):
                candidates.append((proc, held))
        if not candidates:
            return None
        proc, held = self.rng.choice(candidates)
        last = {j: self.last_epoch(j) for j in held}
        at = time.time()
        proc.process.send_signal(signal.SIGKILL)
        proc.process.wait()
        self.dispatchers.remove(proc)
        self.retired.append(proc)
        replacement = self.start_dispatcher()
        target = (f"dispatcher {proc.name} (pid {proc.process.pid}); replacement "
                  f"{replacement.name} (pid {replacement.process.pid})")  # fmt: skip
        return Kill(number, "dispatcher", target, at, held, last)

    def kill_worker(self, number: int) -> Kill | None:
        table = process_table()
        live = [p for p in descendants(os.getpid(), table) if "RayTrainWorker" in table[p][1]]
        if any(pid not in self.worker_of for pid in live):
            self.map_workers()
        leases = self.lease_tokens(sorted({self.worker_of[p][0] for p in live
                                           if p in self.worker_of}))  # fmt: skip
        candidates = []
        for pid in live:
            if pid not in self.worker_of:
                continue
            job_id, token = self.worker_of[pid]
            if job_id not in self.jobs or leases.get(job_id) != token:
                continue
            if self.worker_kills_per_run[(job_id, token)] >= MAX_FAILURES:
                continue  # one more would be a legitimate failure; keep every job able to pass
            if self.training_recently(job_id, token):
                candidates.append((pid, job_id, token))
        if not candidates:
            return None
        pid, job_id, token = self.rng.choice(candidates)
        last = {job_id: self.last_epoch(job_id)}
        at = time.time()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return None
        self.worker_kills_per_run[(job_id, token)] += 1
        return Kill(number, "worker", f"RayTrainWorker pid {pid}", at, {job_id: token}, last)

    def last_epoch(self, job_id: str) -> int | None:
        entries = self.jobs[job_id].entries
        return int(entries[-1][1]["epoch"]) if entries else None

    def replace_crashed_dispatchers(self) -> None:
        for proc in list(self.dispatchers):
            code = proc.process.poll()
            if code is not None:
                tail = proc.log.read_text(errors="replace").splitlines()[-5:]
                self.crashed.append(f"{proc.name} exited with {code} on its own: {tail}")
                self.say(f"SUSPICIOUS: dispatcher {proc.name} exited with {code} by itself")
                self.dispatchers.remove(proc)
                self.retired.append(proc)
                self.start_dispatcher()

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> int:
        self.start()
        with TestClient(create_app(self.settings)) as client:
            self.submit(client)
            kinds = ["dispatcher"] * math.ceil(self.args.kills / 2)
            kinds += ["worker"] * (self.args.kills // 2)
            self.rng.shuffle(kinds)
            deadline = time.monotonic() + self.args.timeout
            next_kill_at: float | None = None
            due_since: float | None = None
            while time.monotonic() < deadline:
                self.poll()
                self.replace_crashed_dispatchers()
                if all(w.terminal or w.missing for w in self.jobs.values()):
                    break
                started = any(w.entries for w in self.jobs.values())
                if kinds and started and next_kill_at is None:
                    next_kill_at = time.monotonic() + self.rng.uniform(*FIRST_KILL_S)
                if kinds and next_kill_at is not None and time.monotonic() >= next_kill_at:
                    due_since = due_since or time.monotonic()
                    waited = time.monotonic() - due_since
                    number = len(self.kills) + 1
                    kill = None
                    # the planned kind first; after 20 s without a target of that kind, either
                    order = [kinds[0]] + ([k for k in ("dispatcher", "worker") if k != kinds[0]]
                                          if waited > 20 else [])  # fmt: skip
                    for kind in order:
                        if kind == "dispatcher":
                            kill = self.kill_dispatcher(number, patient=waited > 10)
                        else:
                            kill = self.kill_worker(number)
                        if kill is not None:
                            kinds.remove(kind if kind in kinds else kinds[0])
                            break
                    if kill is not None:
                        self.kills.append(kill)
                        jobs = ", ".join(f"{j} token {t} epoch {kill.last_epoch[j]}"
                                         for j, t in kill.jobs.items())  # fmt: skip
                        self.say(f"kill {number}: {kill.target}; hit {jobs}")
                        next_kill_at = time.monotonic() + self.rng.uniform(*KILL_GAP_S)
                        due_since = None
                time.sleep(POLL_S)
            if kinds:
                self.say(f"only {len(self.kills)} of {self.args.kills} kills happened: no "
                         "target was left while jobs ran")  # fmt: skip
            time.sleep(1.0)  # anything still on its way lands in the streams
            self.poll()
            return self.report(client)

    # -- the verdict ----------------------------------------------------------------------------
    def measure_recovery(self, kill: Kill, end: float) -> float:
        worst = 0.0
        kill_ms = int(kill.at * 1000)
        for job_id, token in kill.jobs.items():
            watch = self.jobs[job_id]
            moments: list[tuple[int, str]] = []
            for entry_id, entry in watch.entries:
                ms = stream_key(entry_id)[0]
                if kill.kind == "dispatcher" and entry["token"] > token and ms > kill_ms:
                    moments.append((ms, f"epoch {entry['epoch']} under token {entry['token']}"))
                    break
                if kill.kind == "worker" and ms > kill_ms + IN_FLIGHT_MS:
                    same = entry["token"] == token
                    where = "in the same run" if same else f"under a new token {entry['token']}"
                    moments.append((ms, f"epoch {entry['epoch']} after the restart, {where}"))
                    break
            finished = iso_ms(watch.record.finished_at) if watch.record else None
            if finished is not None and finished > kill_ms:
                moments.append((finished, f"ended {watch.record.state.value}"))  # type: ignore[union-attr]
            if kill.kind == "dispatcher":
                claims = [(seen, t) for seen, t in watch.leases if t > token and seen >= kill.at]
                if claims:
                    seen, new_token = claims[0]
                    taken = f"token {new_token} claimed after ~{seen - kill.at:.1f} s, "
                else:
                    taken = "never claimed again, "
            else:
                taken = ""
            if moments:
                ms, how = min(moments)
                how = taken + how
                kill.recovery[job_id] = (ms - kill_ms) / 1000
                kill.how[job_id] = how
            else:
                kill.recovery[job_id] = None
                kill.how[job_id] = taken + "never made progress again"
            seconds = kill.recovery[job_id]
            worst = max(worst, seconds if seconds is not None else end - kill.at)
        return worst

    def duplicate_run_reasons(self, client: TestClient, watch: JobWatch) -> list[str]:
        reasons = []
        entries = self.store.metrics_after(watch.job_id) if self.store else []
        # (re-read from the start: the stream as Redis holds it at the end)
        all_entries = list(entries)
        while len(entries) == 1000:
            entries = self.store.metrics_after(watch.job_id, entries[-1][0])  # type: ignore[union-attr]
            all_entries.extend(entries)
        spans: dict[int, tuple[tuple[int, int], tuple[int, int]]] = {}
        for entry_id, entry in all_entries:
            key = stream_key(entry_id)
            first, _ = spans.get(entry["token"], (key, key))
            spans[entry["token"]] = (first, key)
        ordered = sorted(spans.items(), key=lambda item: item[1][0])
        for (token_a, (_, last_a)), (token_b, (first_b, _)) in zip(ordered, ordered[1:],
                                                                    strict=False):  # fmt: skip
            if token_b < token_a:
                reasons.append(f"token {token_b} wrote after token {token_a}")
            if not last_a < first_b:
                reasons.append(f"tokens {token_a} and {token_b} wrote at the same time "
                               f"({last_a} >= {first_b})")  # fmt: skip
        record = watch.record
        finished = iso_ms(record.finished_at) if record else None
        if finished is not None and all_entries:
            last_ms = stream_key(all_entries[-1][0])[0]
            if last_ms > finished:
                reasons.append(f"an epoch was published {last_ms - finished} ms after the end")
        terminal_states = [s for s in watch.states if s in {"succeeded", "failed", "cancelled"}]
        if len(set(terminal_states)) > 1 or (terminal_states and watch.states[-1] not in
                                              {"succeeded", "failed", "cancelled"}):  # fmt: skip
            reasons.append(f"terminal state changed: {watch.states}")
        if record is not None and record.state.value == "succeeded":
            response = client.get(f"/v1/jobs/{watch.job_id}/artifacts/metrics.jsonl")
            if response.status_code != 200:
                reasons.append(f"metrics.jsonl: HTTP {response.status_code}")
            else:
                epochs = [json.loads(line)["epoch"] for line in response.text.splitlines()
                          if line.strip()]  # fmt: skip
                if sorted(epochs) != list(range(watch.epochs)):
                    counts: dict[int, int] = defaultdict(int)
                    for epoch in epochs:
                        counts[epoch] += 1
                    twice = sorted(e for e, n in counts.items() if n > 1)
                    missing = sorted(set(range(watch.epochs)) - set(epochs))
                    reasons.append(f"metrics.jsonl: epochs twice {twice[:10]}, missing "
                                   f"{missing[:10]} (of {watch.epochs})")  # fmt: skip
        return reasons

    def report(self, client: TestClient) -> int:
        end = time.time()
        self.say(f"done after {end - self.t0:.1f} s")
        lost = [w.job_id for w in self.jobs.values() if w.missing]
        stuck = [w.job_id for w in self.jobs.values() if not w.missing and not w.terminal]
        states: dict[str, int] = defaultdict(int)
        for watch in self.jobs.values():
            states["lost" if watch.missing else watch.record.state.value] += 1  # type: ignore[union-attr]
        duplicates: dict[str, list[str]] = {}
        for watch in self.jobs.values():
            if not watch.missing:
                reasons = self.duplicate_run_reasons(client, watch)
                if reasons:
                    duplicates[watch.job_id] = reasons
        expected_failures: list[str] = []
        unexpected: list[str] = []
        for watch in self.jobs.values():
            record = watch.record
            if watch.missing or record is None or record.state.value != "failed":
                continue
            runs = [t for (j, t), n in self.worker_kills_per_run.items()
                    if j == watch.job_id and n > MAX_FAILURES]  # fmt: skip
            over_takeovers = record.takeovers >= DEFAULT_MAX_TAKEOVERS
            line = (f"{watch.job_id} (attempts {record.attempts}, takeovers "
                    f"{record.takeovers}): {record.error}")  # fmt: skip
            (expected_failures if runs or over_takeovers else unexpected).append(line)
        max_recovery = 0.0
        for kill in self.kills:
            max_recovery = max(max_recovery, self.measure_recovery(kill, end))
            when = kill.at - self.t0
            parts = []
            for job_id in kill.jobs:
                seconds = kill.recovery[job_id]
                shown = f"{seconds:.1f} s" if seconds is not None else "NEVER"
                parts.append(f"{job_id} {shown} ({kill.how[job_id]})")
            print(
                f"kill {kill.number} at +{when:.1f}s: {kill.kind}: {kill.target}; recovery: "
                + "; ".join(parts)
            )
        takeovers = sum(w.record.takeovers for w in self.jobs.values() if w.record)
        restarted = sum(1 for w in self.jobs.values() if w.record and w.record.attempts > 1)
        print("final states: " + ", ".join(f"{k}={v}" for k, v in sorted(states.items()))
              + f"; failed={len(expected_failures) + len(unexpected)} (within the fault budget, "
              f"so a bug: {len(unexpected)}); jobs run more than once: {restarted}, takeovers: "
              f"{takeovers}")  # fmt: skip
        for line in unexpected:
            print(f"UNEXPECTED FAILURE: {line}")
        for line in expected_failures:
            print(f"failed past the fault budget: {line}")
        for job_id in lost:
            print(f"LOST: {job_id}")
        for job_id in stuck:
            watch = self.jobs[job_id]
            print(
                f"STUCK: {job_id} state {watch.record.state.value if watch.record else '?'}, "
                f"states seen {watch.states}, last epoch {self.last_epoch(job_id)}"
            )
        for job_id, reasons in duplicates.items():
            print(f"DUPLICATE RUN: {job_id}: {'; '.join(reasons)}")
        for job_id, (first, last, tokens) in self.overlaps.items():
            print(
                f"SUSPICIOUS: {job_id} had live RayTrainWorker processes of tokens "
                f"{sorted(tokens)} at once, from +{first - self.t0:.1f}s to +{last - self.t0:.1f}s"
            )
        for pid, (job_id, token, first, last) in self.stale_workers.items():
            if last - first >= 2 * LEASE_TTL_S:
                print(
                    f"SUSPICIOUS: RayTrainWorker pid {pid} of {job_id} token {token} lived "
                    f"{last - first:.1f} s after its run was superseded or the job ended"
                )
        for line in self.crashed:
            print(f"SUSPICIOUS: {line}")
        for line in self.submit_errors:
            print(f"SUBMIT REFUSED: {line}")
        print(f"wall_s={end - self.t0:.1f}")
        bad = bool(lost or stuck or duplicates or unexpected)
        self.findings = bad or bool(self.crashed or self.submit_errors or self.overlaps)
        print(
            f"jobs={len(self.jobs)} kills={len(self.kills)} lost={len(lost)} "
            f"duplicate_runs={len(duplicates)} stuck={len(stuck)} "
            f"max_recovery_s={max_recovery:.1f}",
            flush=True,
        )
        return 1 if bad else 0


def on_term(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for the jobs")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args()

    signal.signal(signal.SIGTERM, on_term)
    chaos = Chaos(args)
    code = 2
    try:
        code = chaos.run()
    except KeyboardInterrupt:
        print("interrupted; cleaning up", flush=True)
        code = 130
    finally:
        chaos.stop()
        if args.keep or chaos.findings or code != 0:
            print(f"kept {chaos.workdir} (logs/ and storage/jobs/*/logs/)", flush=True)
        else:
            shutil.rmtree(chaos.workdir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())

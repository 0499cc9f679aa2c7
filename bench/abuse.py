"""Hostile and careless clients against a live `aetrain up` with auth on: one line per case.

    .venv/bin/python bench/abuse.py [--keep]

Starts `aetrain up` (its own Redis and local Ray) in a temporary home with AETRAIN_AUTH=on,
creates API keys with `aetrain keys create`, then runs each case of issue 9 and prints what the
service answered and how long it took, with the peak resident memory of the API and the
dispatcher processes during the case (sampled from /proc every 50 ms) and at the end
(VmHWM, the kernel's high-water mark). Every request goes to 127.0.0.1 only.
"""

import argparse
import io
import json
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stack import Stack, running_stack  # noqa: E402

DIGITS = {"kind": "autoencoder", "name": "digits", "data": {"dataset": "digits"},
          "model": {"arch": "dense", "hidden": [32], "latent_dim": 8},
          "training": {"epochs": 3, "checkpoint_every": 5}}  # fmt: skip
DIVERGING = {"kind": "autoencoder", "name": "diverges", "data": {"dataset": "swiss_roll"},
             "model": {"arch": "dense", "hidden": [64, 64], "latent_dim": 2},
             "training": {"epochs": 20, "optimizer": "sgd", "lr": 10.0}}  # fmt: skip
TERMINAL = {"succeeded", "failed", "cancelled"}


# -- memory of the stack's processes ----------------------------------------------------------
def status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class MemoryWatch:
    """Peak RSS of the API and the dispatcher, sampled in a thread while a case runs."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak = dict.fromkeys(pids, 0)
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], status_kib(pid, "VmRSS"))
            time.sleep(0.05)

    @contextmanager
    def case(self) -> Iterator[dict[str, int]]:
        self.peak = dict.fromkeys(self.pids, 0)
        self._stop.clear()
        thread = threading.Thread(target=self._sample, daemon=True)
        thread.start()
        try:
            yield self.peak
        finally:
            self._stop.set()
            thread.join()


# -- the stack (bench/stack.py) -------------------------------------------------------------------
def create_key(stack: Stack, tenant: str, max_priority: int = 4) -> str:
    made = subprocess.run(
        [sys.executable, "-m", "service.cli", "keys", "create", "--tenant", tenant,
         "--max-priority", str(max_priority)],
        env=stack.env, cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return made.stdout.strip().splitlines()[-1]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def wait_for(http: httpx.Client, job_id: str, timeout_s: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job: dict[str, Any] = http.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in TERMINAL:
            return job
        time.sleep(0.3)
    raise RuntimeError(f"job {job_id} did not finish in {timeout_s} s")


def strict_json(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


# -- hostile payloads ---------------------------------------------------------------------------
def npz_bomb(declared_bytes: int) -> bytes:
    """A small .npz whose x.npy declares `declared_bytes` of int8 zeros (deflated ~1000x)."""
    rows = declared_bytes // 1024
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|i1", "fortran_order": False, "shape": (rows, 1024)}
    )
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            member.write(header.getvalue())
            zeros = bytes(2**20)
            for _ in range(declared_bytes // len(zeros)):
                member.write(zeros)
    return out.getvalue()


def npz_of(x: np.ndarray, y: np.ndarray | None = None) -> bytes:
    out = io.BytesIO()
    np.savez(out, x=x) if y is None else np.savez(out, x=x, y=y)
    return out.getvalue()


def unsent_body(url: str, path: str, declared: int, headers: str = "") -> tuple[int, float]:
    """Declare a `declared`-byte JSON body, send 9 bytes of it: (status, seconds to answer)."""
    host, port = url.removeprefix("http://").split(":")
    started = time.perf_counter()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {declared}\r\n{headers}\r\n")  # fmt: skip
        sock.sendall(head.encode() + b'{"kind": ')
        answer = sock.recv(4096)
    return int(answer.split(b" ", 2)[1]), time.perf_counter() - started


# -- the cases ----------------------------------------------------------------------------------
Case = Callable[[Stack, dict[str, str]], str]


def diverged_training(stack: Stack, keys: dict[str, str]) -> str:
    with httpx.Client(base_url=stack.url, headers=bearer(keys["alice"]), timeout=30) as http:
        job_id = http.post("/v1/jobs", json=DIVERGING).json()["id"]
        job = wait_for(http, job_id)
        reads = [http.get(f"/v1/jobs/{job_id}"), http.get("/v1/jobs"),
                 http.get(f"/v1/jobs/{job_id}/events")]  # fmt: skip
        for read in reads[:2]:  # the events are text/event-stream: each data line is JSON
            strict_json(read.text)
        for line in reads[2].text.splitlines():
            if line.startswith("data: "):
                strict_json(line.removeprefix("data: "))
        codes = [r.status_code for r in reads]
        return f"state={job['state']} reads={codes} error={str(job['error'])[:70]!r}"


def anonymous_huge_body(stack: Stack, keys: dict[str, str]) -> str:
    status, seconds = unsent_body(stack.url, "/v1/jobs", 100 * 2**20)
    return f"100 MiB declared, 9 B sent, no key -> {status} in {seconds * 1000:.0f} ms"


def keyed_huge_body(stack: Stack, keys: dict[str, str]) -> str:
    auth = f"Authorization: Bearer {keys['alice']}\r\n"
    status, seconds = unsent_body(stack.url, "/v1/jobs", 100 * 2**20, auth)
    return f"100 MiB declared with a key -> {status} in {seconds * 1000:.0f} ms"


def upload_bomb(stack: Stack, keys: dict[str, str]) -> str:
    bomb = npz_bomb(2**30)
    started = time.perf_counter()
    response = httpx.post(f"{stack.url}/v1/datasets", content=bomb, headers=bearer(keys["alice"]),
                          timeout=120)  # fmt: skip
    seconds = time.perf_counter() - started
    stored = sum(f.stat().st_size for f in (stack.home / "storage" / "datasets").glob("*.npz"))
    return (f"{len(bomb) / 2**10:.0f} KiB .npz declaring 1 GiB int8 -> {response.status_code} in "
            f"{seconds:.2f} s; datasets/ holds {stored / 2**20:.1f} MiB")  # fmt: skip


def repeated_upload(stack: Stack, keys: dict[str, str]) -> str:
    rng = np.random.default_rng(0)
    body = npz_of(rng.random((20_000, 256), dtype=np.float32))
    times = []
    for _ in range(2):
        started = time.perf_counter()
        response = httpx.post(f"{stack.url}/v1/datasets", content=body, timeout=120,
                              headers=bearer(keys["alice"]))  # fmt: skip
        times.append(time.perf_counter() - started)
    return (f"{len(body) / 2**20:.1f} MiB upload twice: {times[0]:.2f} s then {times[1]:.2f} s "
            f"({times[0] / times[1]:.1f}x), second -> {response.status_code}")  # fmt: skip


def wide_pictures(stack: Stack, keys: dict[str, str]) -> str:
    rng = np.random.default_rng(1)
    x = rng.random((50, 65536), dtype=np.float32)
    with httpx.Client(base_url=stack.url, headers=bearer(keys["alice"]), timeout=300) as http:
        dataset = http.post("/v1/datasets", content=npz_of(x)).json()["id"]
        spec = {"kind": "autoencoder", "name": "wide", "data": {"dataset": dataset},
                "model": {"arch": "dense", "hidden": [], "latent_dim": 4},
                "training": {"epochs": 1, "batch_size": 16}}  # fmt: skip
        job_id = http.post("/v1/jobs", json=spec).json()["id"]
        job = wait_for(http, job_id)
        started = time.perf_counter()
        png = http.post(f"/v1/jobs/{job_id}/interpolate", params={"format": "png"},
                        json={"a": 0, "b": 1, "steps": 64})  # fmt: skip
        png_s = time.perf_counter() - started
        refused = http.post(f"/v1/jobs/{job_id}/interpolate", json={"a": 0, "b": 1, "steps": 64})
        reply = http.post(f"/v1/jobs/{job_id}/interpolate", json={"a": 0, "b": 1, "steps": 3})
    return (f"(50, 65536) job {job['state']}; 64-step PNG {png.status_code} "
            f"{len(png.content) / 2**10:.0f} KiB in {png_s:.2f} s; 64-step JSON "
            f"{refused.status_code}; 3-step JSON {reply.status_code} "
            f"{len(reply.content) / 2**20:.1f} MiB")  # fmt: skip


def many_streams(stack: Stack, keys: dict[str, str]) -> str:
    with httpx.Client(base_url=stack.url, headers=bearer(keys["alice"]), timeout=30) as http:
        job_id = http.post("/v1/jobs", json={**DIGITS, "training": {"epochs": 5000}}).json()["id"]
    statuses: list[int] = []
    opened: list[tuple[httpx.Client, httpx.Response]] = []
    for _ in range(300):
        client = httpx.Client(base_url=stack.url, headers=bearer(keys["alice"]), timeout=30)
        response = client.send(client.build_request("GET", f"/v1/jobs/{job_id}/events"),
                               stream=True)  # fmt: skip
        statuses.append(response.status_code)
        if response.status_code == 200:
            opened.append((client, response))
        else:
            response.close()
            client.close()
    started = time.perf_counter()
    health = httpx.get(f"{stack.url}/healthz", timeout=60)
    health_ms = (time.perf_counter() - started) * 1000
    for client, response in opened:
        response.close()
        client.close()
    httpx.post(f"{stack.url}/v1/jobs/{job_id}/cancel", headers=bearer(keys["alice"]))
    return (f"300 SSE streams of one tenant: {statuses.count(200)} open, {statuses.count(429)} "
            f"refused 429; /healthz {health.status_code} in {health_ms:.0f} ms")  # fmt: skip


def revoked_stream(stack: Stack, keys: dict[str, str]) -> str:
    key = create_key(stack, "mallory")
    with httpx.Client(base_url=stack.url, headers=bearer(key), timeout=60) as http:
        job_id = http.post("/v1/jobs", json={**DIGITS, "training": {"epochs": 5000}}).json()["id"]
        with http.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
            key_id = key.split("_")[1]
            subprocess.run([sys.executable, "-m", "service.cli", "keys", "revoke", key_id],
                           env=stack.env, cwd=REPO, capture_output=True, check=True)  # fmt: skip
            revoked_at = time.perf_counter()
            for _ in stream.iter_bytes():
                if time.perf_counter() - revoked_at > 30:
                    break
            closed_s = time.perf_counter() - revoked_at
    httpx.post(f"{stack.url}/v1/jobs/{job_id}/cancel", headers=bearer(keys["alice"]))
    return f"stream of a revoked key closed {closed_s:.1f} s after the revocation"


def submit_cancel_loop(stack: Stack, keys: dict[str, str]) -> str:
    redis = stack.store.redis
    before = redis.info("memory")["used_memory"]
    accepted, refused, ids = 0, 0, []
    with httpx.Client(base_url=stack.url, headers=bearer(keys["bob"]), timeout=30) as http:
        for _ in range(1500):
            response = http.post("/v1/jobs", json=DIGITS)
            if response.status_code == 201:
                accepted += 1
                ids.append(response.json()["id"])
                http.post(f"/v1/jobs/{ids[-1]}/cancel")
            else:
                refused += 1
        grown = redis.info("memory")["used_memory"] - before
        deleted = sum(http.delete(f"/v1/jobs/{job_id}").status_code == 204 for job_id in ids)
    after = redis.info("memory")["used_memory"] - before
    return (f"1500 submit+cancel: {accepted} accepted, {refused} refused (429); Redis "
            f"+{grown / 2**10:.0f} KiB, after {deleted} DELETEs "
            f"{after / 2**10:+.0f} KiB")  # fmt: skip


def readyz_without_key(stack: Stack, keys: dict[str, str]) -> str:
    anonymous = httpx.get(f"{stack.url}/readyz").text
    return f"/readyz without a key: {anonymous}"


def rebinding_host(stack: Stack, keys: dict[str, str]) -> str:
    foreign = httpx.get(f"{stack.url}/v1/jobs", headers={"Host": "rebind.evil.example"})
    return f"Host: rebind.evil.example without a key -> {foreign.status_code} (auth on)"


def priority_flood(stack: Stack, keys: dict[str, str]) -> str:
    with (
        httpx.Client(base_url=stack.url, headers=bearer(keys["bob"]), timeout=30) as bob,
        httpx.Client(base_url=stack.url, headers=bearer(keys["carol"]), timeout=30) as carol,
    ):
        over = bob.post("/v1/jobs", json={**DIGITS, "priority": 9})
        flood = [bob.post("/v1/jobs", json={**DIGITS, "priority": 4}).json()["id"]
                 for _ in range(12)]  # fmt: skip
        job = wait_for(carol, carol.post("/v1/jobs", json=DIGITS).json()["id"])
        started = [bob.get(f"/v1/jobs/{job_id}").json()["started_at"] for job_id in flood]
        ahead = sum(1 for s in started if s is not None and s < job["started_at"])
        for job_id in flood:
            bob.post(f"/v1/jobs/{job_id}/cancel")
    return (f"priority 9 with a max-4 key -> {over.status_code}; 12 of bob's jobs at priority 4 "
            f"then 1 of carol's at 0: {ahead} of bob's started before carol's")  # fmt: skip


def redis_full(stack: Stack, keys: dict[str, str]) -> str:
    stack.store.redis.config_set("maxmemory", "1")
    try:
        full = httpx.post(f"{stack.url}/v1/jobs", json=DIGITS, headers=bearer(keys["alice"]))
    finally:
        stack.store.redis.config_set("maxmemory", "0")
    retry_after = full.headers.get("Retry-After")
    return f"Redis out of memory: POST -> {full.status_code} Retry-After {retry_after}"


CASES: list[Case] = [
    readyz_without_key, rebinding_host, anonymous_huge_body, keyed_huge_body, upload_bomb,
    repeated_upload, diverged_training, wide_pictures, many_streams, revoked_stream,
    priority_flood, submit_cancel_loop, redis_full,
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary home")
    parser.add_argument("--only", nargs="*", help="run only these cases")
    args = parser.parse_args()
    with running_stack(auth="on", keep=args.keep, prefix="aetrain-abuse-") as stack:
        print(f"aetrain up with auth on in {stack.home}", flush=True)
        keys = {tenant: create_key(stack, tenant) for tenant in ("alice", "bob", "carol")}
        running = stack.pids
        pids = {role: running[role] for role in ("api", "dispatcher")}
        watch = MemoryWatch(pids)
        for case in CASES:
            if args.only and case.__name__ not in args.only:
                continue
            with watch.case() as peak:
                started = time.perf_counter()
                try:
                    line = case(stack, keys)
                except Exception as exc:  # a bench reports; it does not stop at the first case
                    line = f"ERROR {type(exc).__name__}: {exc}"
                seconds = time.perf_counter() - started
            memory = "  ".join(f"{name} {kib / 1024:.0f} MiB" for name, kib in peak.items())
            print(f"{case.__name__:22s} {seconds:6.1f} s  peak RSS: {memory}  | {line}",
                  flush=True)  # fmt: skip
        hwm = "  ".join(f"{name} {status_kib(pid, 'VmHWM') / 1024:.0f} MiB"
                        for name, pid in pids.items())  # fmt: skip
        print(f"{'high-water marks':22s} {hwm}")


if __name__ == "__main__":
    main()

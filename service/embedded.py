"""`aetrain up`: the whole stack on one machine, as supervised child processes.

redis-server (unless AETRAIN_REDIS_URL is set), one dispatcher (which starts a local Ray
unless RAY_ADDRESS is set) and the API. A child that dies is started again (Redis on the same
port, replaying its append-only file), up to _MAX_RESTARTS times a minute. Ctrl-C stops them in
order: the API, then the dispatcher (running jobs go back to the queue and resume from their
checkpoint on the next start), then Redis.

Redis runs with `appendfsync always`: every write is on disk before Redis answers it, so a
job that got a 201 survives even a kill -9 of Redis or a power cut. Our write rate (records
and one metrics line per epoch) is far below what an fsync per write costs.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import redis

from shared.settings import Settings
from workers.faults import restart_delay_s
from workers.processes import die_with_parent

_STOP_TIMEOUT_S = 60.0
_MAX_RESTARTS = 5  # per child and minute; past it something is broken for good
REDIS_URL_FILE = "redis.url"  # under AETRAIN_HOME: how `aetrain keys` finds the private Redis


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    args: list[str]
    env: dict[str, str]
    signum: int


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def find_redis_url(settings: Settings) -> str | None:
    """AETRAIN_REDIS_URL, else the URL of the redis-server that `aetrain up` last started."""
    if settings.redis_url:
        return settings.redis_url
    try:
        url = (settings.home.resolve() / REDIS_URL_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    return url or None


def _spawn(name: str, args: list[str], env: dict[str, str], logs: Path, signum: int) -> Child:
    log_path = logs / f"{name}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            args,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches only `up`, which stops children in order
            # Safe here, unlike in the dispatcher: `up` runs no threads that could hold a lock
            # across the fork (see workers.processes.parent_death_env).
            preexec_fn=lambda: die_with_parent(signum),
        )
    return Child(name, process, log_path, args, env, signum)


def _wait_for_redis(url: str, child: Child, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise RuntimeError(f"redis-server exited; see {child.log_path}")
        with contextlib.suppress(redis.ConnectionError, redis.BusyLoadingError):
            if client.ping():
                return
        time.sleep(0.1)
    raise RuntimeError(
        f"redis-server did not answer within {timeout_s:.0f} s; see {child.log_path}"
    )


def start_redis(home: Path, env: dict[str, str], logs: Path) -> tuple[Child, str]:
    data = home / "redis"
    data.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = [
        "redis-server",
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(data),
        "--appendonly", "yes",
        "--appendfsync", "always",
        "--save", "",
        # A full Redis must refuse writes (503 to clients), never drop job records.
        "--maxmemory-policy", "noeviction",
    ]  # fmt: skip
    try:
        child = _spawn("redis", args, env, logs, signal.SIGTERM)
    except FileNotFoundError:
        raise RuntimeError(
            "redis-server is not installed: install it (apt-get install redis-server) "
            "or set AETRAIN_REDIS_URL to a running Redis"
        ) from None
    url = f"redis://127.0.0.1:{port}/0"
    _wait_for_redis(url, child)
    (home / REDIS_URL_FILE).write_text(url + "\n")
    return child, url


def run_up(settings: Settings, host: str, port: int) -> int:
    """Run the embedded stack until Ctrl-C or a child dies; returns the exit code."""
    home = settings.home.resolve()
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "AETRAIN_HOME": str(home),
        "AETRAIN_STORAGE": settings.storage_root,
        "AETRAIN_AUTH": os.environ.get("AETRAIN_AUTH", "off"),
        # One one-worker group kept started: the first job trains within a second of its
        # submission instead of paying the group's start (seconds to tens of seconds).
        "AETRAIN_WARM_GROUPS": os.environ.get("AETRAIN_WARM_GROUPS", "1"),
    }
    children: list[Child] = []
    stop_requested = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        if settings.redis_url:
            env["AETRAIN_REDIS_URL"] = settings.redis_url
        else:
            redis_child, env["AETRAIN_REDIS_URL"] = start_redis(home, env, logs)
            children.append(redis_child)
        cli = [sys.executable, "-m", "service.cli"]
        children.append(_spawn("worker", [*cli, "worker"], env, logs, signal.SIGTERM))
        api = [*cli, "api", "--host", host, "--port", str(port)]
        children.append(_spawn("api", api, env, logs, signal.SIGTERM))
        print(f"aetrain is up: API http://{host}:{port}  (state in {home}, logs in {logs})")
        if env["AETRAIN_AUTH"] == "on":
            print("API keys are on: create one with `aetrain keys create --tenant NAME`.")
        print("Ctrl-C stops it; running jobs resume from their checkpoints on the next start.")
        sys.stdout.flush()
        restarts: dict[str, list[float]] = {}
        while not stop_requested:
            for i, child in enumerate(children):
                if child.process.poll() is None:
                    continue
                now = time.monotonic()
                recent = [t for t in restarts.get(child.name, []) if now - t < 60.0]
                print(f"aetrain: {child.name} exited with code {child.process.returncode}; "
                      f"see {child.log_path}", file=sys.stderr)  # fmt: skip
                if len(recent) >= _MAX_RESTARTS:
                    raise RuntimeError(f"{child.name} died {len(recent) + 1} times in a minute")
                time.sleep(restart_delay_s())
                children[i] = restart(child, logs, env.get("AETRAIN_REDIS_URL", ""))
                restarts[child.name] = [*recent, now]
                print(f"aetrain: {child.name} started again", file=sys.stderr)
            time.sleep(0.2)
    except RuntimeError as exc:
        print(f"aetrain up: {exc}", file=sys.stderr)
        code = 1
    finally:
        stop_children(children)
    print("aetrain stopped.")
    return code


def restart(child: Child, logs: Path, redis_url: str) -> Child:
    """The same process again; Redis keeps its port, so nobody's URL changes."""
    again = _spawn(child.name, child.args, child.env, logs, child.signum)
    if child.name == "redis":
        _wait_for_redis(redis_url, again)
    return again


def stop_children(children: list[Child]) -> None:
    """Stop the API, then the dispatcher, then Redis (reverse start order)."""
    for child in reversed(children):
        if child.process.poll() is None:
            child.process.terminate()
            try:
                child.process.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()

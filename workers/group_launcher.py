"""Starts warm groups' driver processes by fork, from a process that has their imports loaded.

A group's driver (warm_group.py) imports Ray, Ray Train and, through `ray.train.torch`, torch
and pandas before it can start its run: measured on 2 cores, 3.1-4.3 CPU-s and 2-3 s of
every group's start (0.9-1.0 CPU-s forked, docs/design.md). The launcher,
`python -m workers.group_launcher`, imports most of that once (PRELOAD) and forks a driver
per request. A fork shares the imported pages and starts in milliseconds; nothing in the
launcher has started a thread that a fork could catch holding a lock (Ray is imported, never
initialized).

Its protocol is JSON lines: the pool writes a `LaunchRequest` to its stdin; it answers
`{"launched": pid}` (or `{"error": ...}`) and, when a driver ends, `{"exited": pid,
"code": returncode}` on its stdout. One launcher serves every pool of a process
(`shared_launcher`). When its stdin closes, or the dispatcher's process dies, it ends, and
its drivers get their parent-death signal, as drivers started by the dispatcher itself did:
their Ray jobs end with them.
"""

import contextlib
import importlib
import json
import logging
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from pydantic import BaseModel, ConfigDict

from shared import locations
from workers.processes import die_with_parent, die_with_parent_from_env, parent_death_env

log = logging.getLogger("aetrain.groups")

START_TIMEOUT_S = 120.0  # the launcher's imports, on a loaded machine
EXIT_REPORT_S = 2.0  # how long an ended driver's return code may take to be reported


class LaunchRequest(BaseModel):
    model_config = ConfigDict(frozen=True)

    config: str  # the group's GroupConfig (JSON file)
    log: str  # the driver's stdout and stderr
    # The dispatcher's object storage settings (AWS_*) as they are now, not as they were
    # when the launcher started: the driver hands them on to its ranks (warm_group.run).
    env: dict[str, str] = {}


# -- the launcher process -----------------------------------------------------------------------
# What every driver imports and a fork may share. Not Ray Train, nor Ray Data under it: their
# modules declare Ray actors at import, and that seeds the random generator of Ray's C++ core
# (ActorClassID.from_random), which a fork copies: every forked driver then drew the same
# "random" ids, and two drivers starting at once failed their core worker's start on one
# plasma object id ("Seal() called on an object without a reference to it"; 3 of 60 group
# starts here, and a CI failure). Each driver imports Ray Train itself, after the fork.
PRELOAD = ("torch", "pandas", "ray", "redis", "pydantic", "shared.group_channel", "shared.store")


def serve() -> None:
    die_with_parent_from_env()
    # A Ctrl-C in `aetrain up`'s terminal reaches every process of its group: the dispatcher
    # ends its groups itself, and the launcher and its drivers end with the dispatcher.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for module in PRELOAD:
        importlib.import_module(module)
    forks_are_distinct = _forked_ids_differ()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    stdin = sys.stdin.buffer.fileno()
    pending = b""
    _reply({"ready": os.getpid(), "forks": forks_are_distinct})
    while True:
        readable, _, _ = select.select([stdin, wake_r], [], [])
        if wake_r in readable:
            os.read(wake_r, 4096)
        _reap()
        if stdin not in readable:
            continue
        data = os.read(stdin, 65536)
        if not data:
            return  # the pool closed; the drivers get their parent-death signal as this ends
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            try:
                request = LaunchRequest.model_validate_json(line)
            except ValueError as exc:
                _reply({"error": f"bad request: {exc}"})
                continue
            try:
                pid = _fork(request, forks_are_distinct, [wake_r, wake_w])
                _reply({"launched": pid})
            except OSError as exc:
                _reply({"error": f"fork failed: {exc}"})


def _forked_ids_differ() -> bool:
    """Whether two processes forked from this one draw different Ray ids. If something
    imported here seeded Ray's generator (another Ray version may), each driver is started
    as a new Python process instead: slower, never wrong."""
    read, write = os.pipe()
    children = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            try:  # whatever happens, a probe never goes on as a second launcher
                from ray._raylet import ObjectID

                os.write(write, ObjectID.from_random().binary())
            finally:
                os._exit(0)
        children.append(pid)
    os.close(write)
    for pid in children:
        os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as drawn:
        data = drawn.read()
    half = len(data) // 2
    return half > 0 and data[:half] != data[half:]


def _reply(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _reply({"exited": pid, "code": os.waitstatus_to_exitcode(status)})


def _fork(request: LaunchRequest, in_place: bool, launcher_fds: list[int]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    launcher = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    _be_driver(request, in_place, launcher, launcher_fds)


def _be_driver(request: LaunchRequest, in_place: bool, launcher: int,
               fds: list[int]) -> NoReturn:  # fmt: skip
    code = 1
    try:
        die_with_parent()
        if os.getppid() != launcher:  # the launcher ended before the signal was armed
            os._exit(1)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in fds:
            os.close(fd)
        log_fd = os.open(request.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        os.close(null)
        os.environ.update(request.env)
        if not in_place:  # the parent-death signal survives the exec
            os.execv(sys.executable, [sys.executable, "-m", "workers.warm_group", request.config])
        from workers import warm_group

        warm_group.serve(Path(request.config))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


# -- the pool's side ----------------------------------------------------------------------------
class DriverProcess:
    """A driver the launcher forked; what the pool needs of a `subprocess.Popen`. Not our
    child, so it is watched and signalled through a pidfd (never a reused pid)."""

    def __init__(self, launcher: "GroupLauncher", pid: int) -> None:
        self.launcher, self.pid = launcher, pid
        self.returncode: int | None = None
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:  # it ended (and was reaped) already
            self._pidfd = None

    def poll(self) -> int | None:
        if self.returncode is None and self._ended(timeout=0):
            self._settle()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not self._ended(timeout):
                raise subprocess.TimeoutExpired(f"driver {self.pid}", timeout or 0)
            self._settle()
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        if self._pidfd is not None and self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def _ended(self, timeout: float | None) -> bool:
        if self._pidfd is None:
            return True
        readable, _, _ = select.select([self._pidfd], [], [], timeout)
        return bool(readable)

    def _settle(self) -> None:
        self.returncode = self.launcher.exit_code(self.pid, EXIT_REPORT_S)
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


class GroupLauncher:
    """The pool's side. `start` begins the launcher's imports without waiting for them;
    `launch` waits for them, then starts one driver at a time. A launcher that died is
    started again.

    The launcher process is started by a thread of its own that reads its answers until it
    ends: its parent-death signal fires when the thread that started it ends
    (PR_SET_PDEATHSIG), not the process, and a stage's thread that started it would have
    taken every group down with it as the stage ended.
    """

    def __init__(self, command: Sequence[str] = (sys.executable, "-m", "workers.group_launcher")
                 ) -> None:  # fmt: skip
        self.command = list(command)
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self._exits: dict[int, int] = {}
        self._exited = threading.Condition()
        self._gone = False  # the launcher process ended: its drivers end with it
        self.forks_in_place: bool | None = None  # drivers forked (True) or started anew

    def start(self) -> None:
        with self._lock:
            self._running()

    def launch(self, config: Path, log: Path) -> DriverProcess:
        with self._lock:
            process = self._running()
            if not self._ready.wait(START_TIMEOUT_S) or self._gone:
                process.kill()
                raise RuntimeError(f"the group launcher did not start in {START_TIMEOUT_S:.0f} s")
            assert process.stdin is not None
            request = LaunchRequest(config=str(config), log=str(log),
                                    env=locations.aws_environment())  # fmt: skip
            try:
                process.stdin.write(request.model_dump_json().encode() + b"\n")
                process.stdin.flush()
                reply = self._replies.get(timeout=START_TIMEOUT_S)
            except (OSError, queue.Empty) as exc:
                process.kill()
                raise RuntimeError(f"the group launcher did not answer: {exc!r}") from exc
        if "launched" not in reply:
            raise RuntimeError(f"the group launcher could not start a group: {reply}")
        return DriverProcess(self, int(reply["launched"]))

    def exit_code(self, pid: int, timeout: float) -> int:
        """The driver's return code as the launcher reported it; -9 if none came (the
        launcher died, and took its drivers along)."""
        with self._exited:
            self._exited.wait_for(lambda: pid in self._exits or self._gone, timeout)
            return self._exits.pop(pid, -signal.SIGKILL)

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def close(self) -> None:
        """End the launcher (its drivers, if any are left, end with it)."""
        with self._lock:
            process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _running(self) -> "subprocess.Popen[bytes]":
        if self._process is not None and self._process.poll() is None:
            return self._process
        self._ready, self._replies, self._gone = threading.Event(), queue.Queue(), False
        started: queue.Queue[subprocess.Popen[bytes] | BaseException] = queue.Queue()
        threading.Thread(target=self._run, args=(started, self._ready, self._replies),
                         name="group-launcher", daemon=True).start()  # fmt: skip
        process = started.get()
        if isinstance(process, BaseException):
            raise RuntimeError(f"the group launcher could not be started: {process}") from process
        self._process = process
        return process

    def _run(self, started: "queue.Queue[subprocess.Popen[bytes] | BaseException]",
             ready: threading.Event, replies: "queue.Queue[dict[str, Any]]") -> None:  # fmt: skip
        env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token"),
               **parent_death_env()}  # fmt: skip
        try:
            process = subprocess.Popen(self.command, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, env=env)  # fmt: skip
        except OSError as exc:
            started.put(exc)
            return
        started.put(process)
        assert process.stdout is not None
        for line in process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                message = None
            if not isinstance(message, dict):  # something it imported printed: not an answer
                log.warning("group launcher: %s", line.decode(errors="replace").rstrip())
                continue
            if "exited" in message:
                with self._exited:
                    self._exits[int(message["exited"])] = int(message["code"])
                    self._exited.notify_all()
            elif "ready" in message:
                self.forks_in_place = bool(message.get("forks"))
                if not self.forks_in_place:
                    log.warning("group launcher: forked processes would share Ray's random ids "
                                "here; each group's driver starts as a new process instead")
                ready.set()
            else:
                replies.put(message)
        replies.put({"error": "the group launcher exited"})
        ready.set()  # wakes a launch that waits for a launcher that died starting
        with self._exited:
            self._gone = True
            self._exited.notify_all()


_SHARED: GroupLauncher | None = None
_SHARED_LOCK = threading.Lock()


def shared_launcher() -> GroupLauncher:
    """The process's launcher: every pool in a process (a dispatcher has one; the tests run
    several) forks its drivers from it, so its imports are paid once per process. It ends
    with the process."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = GroupLauncher()
        return _SHARED


if __name__ == "__main__":
    serve()

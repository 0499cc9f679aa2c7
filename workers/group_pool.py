"""A dispatcher's warm worker groups: started on demand, kept between stages, let go when idle.

A stage runs on an idle group of its shape (workers x CPUs x GPUs) when there is one, else on
a new group. Between stages a group holds its resources on Ray, so the scheduler counts it
(a hold, see shared/scheduler.py). An idle group is retired after `idle_s`, or as soon as a
stage waits for resources (another shape may need its CPUs), or when its hold lapsed and
cannot be taken again. The pool keeps `keep_warm` one-worker groups started while no stage
waits.

A thread beats every group's heartbeat and renews the holds; a group whose dispatcher stops
beating (frozen, or dead) ends itself (warm_group.py).
"""

import logging
import os
import queue
import shutil
import socket
import tempfile
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import ray
import redis

from shared.claims import Claim
from shared.group_channel import GroupChannel, GroupConfig, GroupShape, StageTask
from shared.logs import LogFormat
from shared.store import JobStore
from workers.group_launcher import DriverProcess, shared_launcher

log = logging.getLogger("aetrain.groups")

MAINTAIN_S = 0.5
WAIT_GRACE_S = 1.0  # an idle group is let go for a waiting stage after this long idle
DEFAULT_SHAPE = GroupShape(workers=1, cpus_per_worker=1, gpus_per_worker=0)


GROUP_FOLDER_PREFIX = "aetrain-group-"
OWNER_FILE = "owner"  # host, pid and start of the dispatcher whose group the folder is


def _started(pid: int) -> str:
    """When a process started (clock ticks since boot; "" where /proc has no answer): with
    its pid, it tells the process from a later one given the same pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def owner_line() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()} {pid} {_started(pid)}".rstrip()


def _owner_gone(line: str) -> bool:
    """Whether the dispatcher an owner line names is certainly gone; False when unsure (another
    host's, say, where a folder in a shared temporary folder is not ours to judge)."""
    host, pid_text, *started = line.split()
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return bool(started) and _started(int(pid_text)) not in ("", started[0])


def sweep_orphaned_group_folders(root: Path | None = None) -> list[Path]:
    """Delete the group folders of dispatchers that are gone: one killed outright (SIGKILL, a
    crash) never retired its groups, and nothing else removes their folders (config, log, Ray
    Train's run folder). Folders without an owner file are left alone."""
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob(f"{GROUP_FOLDER_PREFIX}*"):
        try:
            line = (folder / OWNER_FILE).read_text()
        except OSError:
            continue
        if _owner_gone(line):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


@dataclass(frozen=True)
class PoolSettings:
    redis_url: str
    ray_address: str
    idle_s: float = 60.0  # an idle group is retired after this long
    keep_warm: int = 0  # one-worker groups kept started while no stage waits
    hold_ttl_s: float = 15.0  # an idle group's hold lapses this long after its last renewal
    heartbeat_timeout_s: float = 10.0  # a group ends this long after its dispatcher's last beat
    collective_timeout_s: int = 1800
    log_format: LogFormat = "auto"  # of the ranks' own lines (the dispatcher's)
    log_level: str = "INFO"


class WarmGroup:
    def __init__(self, config: GroupConfig, process: DriverProcess,
                 channel: GroupChannel, folder: Path) -> None:  # fmt: skip
        self.config, self.process, self.channel, self.folder = config, process, channel, folder
        self.id, self.shape = config.group_id, config.shape
        self.busy = False
        self.offered = False  # set aside for a stage that asks the scheduler to adopt it
        self.idle_since = time.monotonic()
        self.seq = 0
        self.stages = 0  # how many stages it trained (the benches and tests read it)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def submit(self, **fields: object) -> StageTask:
        self.seq += 1
        task = StageTask.model_validate({**fields, "seq": self.seq, "submitted_at": time.time()})
        self.channel.submit(task)
        return task

    def log_tail(self, limit: int = 4000) -> str:
        path = self.folder / "group.log"
        try:
            with path.open("rb") as file:
                file.seek(max(0, path.stat().st_size - limit))
                return file.read().decode(errors="replace")
        except OSError:
            return ""


class GroupPool:
    def __init__(self, store: JobStore, dispatcher_id: str, settings: PoolSettings) -> None:
        self.store, self.dispatcher_id, self.settings = store, dispatcher_id, settings
        self.groups: dict[str, WarmGroup] = {}
        self._lock = threading.RLock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._total: dict[str, float] = {}
        self._total_at = 0.0
        self._launches: queue.Queue[tuple[GroupShape, Future[WarmGroup]]] = queue.Queue()
        self.launcher = shared_launcher()

    # -- life of the pool -----------------------------------------------------------------------
    def start(self) -> "GroupPool":
        with self._lock:
            if self._thread is None:
                for folder in sweep_orphaned_group_folders():
                    log.info("removed %s: its dispatcher is gone", folder)
                self.launcher.start()  # its imports, while nothing waits for a group yet
                self._closed.clear()
                self._thread = threading.Thread(target=self._maintain_forever,
                                                name="group-pool", daemon=True)  # fmt: skip
                self._thread.start()
        return self

    def close(self) -> None:
        """Retire every group (the stages on them have ended or are given up)."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        while not self._launches.empty():  # asked for as the pool closed: none comes
            self._launches.get_nowait()[1].set_exception(RuntimeError("the group pool closed"))
        with self._lock:
            for group in list(self.groups.values()):
                self._retire(group, "the dispatcher stops")

    # -- what stages use ------------------------------------------------------------------------
    def offer(self, shape: GroupShape) -> str | None:
        """An idle live group of this shape, set aside for one ask to the scheduler."""
        with self._lock:
            for group in self.groups.values():
                if group.shape == shape and not group.busy and not group.offered and group.alive:
                    group.offered = True
                    return group.id
        return None

    def withdraw(self, group_id: str | None) -> None:
        """The ask that was offered the group was not granted: it is free to offer again."""
        with self._lock:
            if group_id in self.groups:
                self.groups[group_id].offered = False

    def take(self, shape: GroupShape, adopted: str | None) -> WarmGroup:
        """The group a granted stage runs on: the adopted one if alive, else a new one."""
        self.start()
        with self._lock:
            group = self.groups.get(adopted or "")
            if group is not None and group.alive and not group.busy:
                group.busy, group.offered = True, False
                return group
            if group is not None:
                self._retire(group, "it died while idle")
        # Launched by the pool's thread, one at a time with the groups it keeps warm.
        launched: Future[WarmGroup] = Future()
        self._launches.put((shape, launched))
        return launched.result()

    def settle(self, claim: Claim, stage: str, group: WarmGroup | None) -> None:
        """The stage is over: its grant becomes the group's hold, or is released with the group."""
        with self._lock:
            reusable = (group is not None and group.alive and not self._closed.is_set()
                        and group.id in self.groups)  # fmt: skip
            if reusable and group is not None:
                try:
                    self.store.scheduler.park(claim, stage, group.id, group.shape.need,
                                              self.settings.hold_ttl_s)  # fmt: skip
                except redis.RedisError:  # unaccounted for, it may not stay: its grant lapses
                    self._retire(group, "its hold could not be recorded")
                    raise
                group.busy, group.offered, group.idle_since = False, False, time.monotonic()
                group.stages += 1
                return
            if group is not None:
                self._retire(group, "it did not end its stage cleanly")
        self.store.scheduler.release(claim, stage)

    def retire(self, group: WarmGroup, reason: str) -> None:
        with self._lock:
            self._retire(group, reason)

    def idle_count(self) -> int:
        with self._lock:
            return sum(1 for g in self.groups.values() if not g.busy and g.alive)

    def idle_cpus(self) -> float:
        with self._lock:
            return sum(g.shape.need["CPU"] for g in self.groups.values() if not g.busy)

    # -- upkeep ---------------------------------------------------------------------------------
    def _maintain_forever(self) -> None:
        next_upkeep = 0.0
        while not self._closed.is_set():
            try:
                wait_s = max(0.0, next_upkeep - time.monotonic())
                shape, launched = self._launches.get(timeout=wait_s)
            except queue.Empty:
                pass
            else:
                try:
                    with self._lock:  # busy from the start: it has no hold to renew
                        launched.set_result(self._launch(shape, busy=True))
                except Exception as exc:
                    launched.set_exception(exc)
                continue
            next_upkeep = time.monotonic() + MAINTAIN_S
            try:
                self.maintain()
            except redis.RedisError as exc:  # the groups wait; their holds lapse if it lasts
                log.warning("group pool: Redis unreachable: %s", exc)
            except Exception:
                log.exception("group pool: upkeep failed; trying again")

    def maintain(self) -> None:
        with self._lock:
            if not self.groups and not self.settings.keep_warm:
                return  # nothing to beat, renew or start: no Redis calls from an idle pool
            groups = list(self.groups.values())
            for group in groups:
                group.channel.beat(self.settings.heartbeat_timeout_s)
            idle = [g for g in groups if not g.busy]
            for group in idle:
                if not group.alive:
                    self._retire(group, f"its process exited ({group.process.returncode})")
            idle = [g for g in idle if g.id in self.groups and not g.offered]
            scheduler = self.store.scheduler
            lapsed = scheduler.renew_holds([g.id for g in idle], self.settings.hold_ttl_s)
            waiting = scheduler.waiting_count() > 0
            now = time.monotonic()
            warm = [g for g in idle if g.shape == DEFAULT_SHAPE]
            for group in idle:
                idle_for = now - group.idle_since
                keep = group in warm[: self.settings.keep_warm]
                if group.id in lapsed and not self._hold_again(group):
                    self._retire(group, "its hold lapsed and its resources are spoken for")
                elif waiting and idle_for > WAIT_GRACE_S:
                    self._retire(group, "a waiting stage may need its resources")
                elif idle_for > self.settings.idle_s and not keep:
                    self._retire(group, f"idle for {idle_for:.0f} s")
            self._keep_warm(waiting)

    def _hold_again(self, group: WarmGroup) -> bool:
        """A lapsed hold (renewals late, Redis restarted empty) is taken again while the
        group's resources are still free and no stage waits for them."""
        return self.store.scheduler.hold(group.id, group.shape.need, self._cluster_total(),
                                         self.settings.hold_ttl_s)  # fmt: skip

    def retire_idle(self, keep: WarmGroup | None = None) -> None:
        """Let every idle group but `keep` go now."""
        with self._lock:
            for group in [g for g in self.groups.values() if not g.busy and g is not keep]:
                self._retire(group, "asked to let idle groups go")

    def _keep_warm(self, waiting: bool) -> None:
        have = sum(1 for g in self.groups.values() if g.shape == DEFAULT_SHAPE)
        if waiting or have >= self.settings.keep_warm:
            return
        group_id = self._new_id()
        if self.store.scheduler.hold(group_id, DEFAULT_SHAPE.need, self._cluster_total(),
                                     self.settings.hold_ttl_s):  # fmt: skip
            self._launch(DEFAULT_SHAPE, group_id)

    def _cluster_total(self) -> dict[str, float]:
        if time.monotonic() - self._total_at > 10.0:
            self._total = {k: float(v) for k, v in ray.cluster_resources().items()}
            self._total_at = time.monotonic()
        return self._total

    def _new_id(self) -> str:
        return f"{self.dispatcher_id}-{uuid.uuid4().hex[:8]}"

    def _launch(
        self, shape: GroupShape, group_id: str | None = None, busy: bool = False
    ) -> WarmGroup:
        group_id = group_id or self._new_id()
        folder = Path(tempfile.mkdtemp(prefix=f"{GROUP_FOLDER_PREFIX}{group_id}-"))
        (folder / OWNER_FILE).write_text(owner_line())
        config = GroupConfig(
            group_id=group_id, shape=shape, redis_url=self.settings.redis_url,
            key_prefix=self.store.prefix, ray_address=self.settings.ray_address,
            ray_storage=str(folder / "ray"),
            collective_timeout_s=self.settings.collective_timeout_s,
            heartbeat_timeout_s=self.settings.heartbeat_timeout_s,
            log_format=self.settings.log_format, log_level=self.settings.log_level,
        )  # fmt: skip
        channel = GroupChannel(self.store.redis, self.store.keys, group_id)
        channel.delete()
        channel.beat(self.settings.heartbeat_timeout_s)
        (folder / "config.json").write_text(config.model_dump_json())
        process = self.launcher.launch(folder / "config.json", folder / "group.log")
        group = WarmGroup(config, process, channel, folder)
        group.busy = busy
        self.groups[group_id] = group
        log.info("group %s (%s): started", group_id, shape)
        return group

    def _retire(self, group: WarmGroup, reason: str) -> None:
        if self.groups.pop(group.id, None) is None:
            return
        log.info("group %s: retired after %d stage(s): %s", group.id, group.stages, reason)
        if group.alive:
            group.process.kill()  # the Ray job, its workers and placement group go with it
        group.process.wait()
        try:
            self.store.scheduler.drop_hold(group.id)
            group.channel.delete()
        except redis.RedisError:  # the hold lapses and the channel expires by themselves
            pass
        shutil.rmtree(group.folder, ignore_errors=True)

"""The channel between a dispatcher and one of its warm worker groups: a Redis hash.

A warm group is a long-lived Ray Train run (workers/warm_group.py) whose ranks train stage
after stage. Its dispatcher hands it one `StageTask` at a time and reads back one
`StageOutcome`; both carry the task's sequence number, so a late outcome of an earlier task is
never taken for the current one's. The hash holds:

    seq          the sequence number of the current task
    task         the current StageTask (JSON)
    outcome      its StageOutcome once the group finished with it (JSON)
    stop         the seq whose stop the dispatcher asked for (cancel, lost lease, shutdown)
    attempts     how many times the group started the current task (a crash restarts it)
    error        the last error a rank raised in the current task
    alive_until  the dispatcher's heartbeat (ms): a group whose dispatcher froze or died ends
    ready        set by rank 0 once the group takes tasks

The hash expires an hour after the dispatcher's last heartbeat, so a dispatcher that died
leaves nothing behind for long. A new task is also published on the hash's name, so an idle
rank waits for it in a blocking read rather than polling (an idle group costs next to no CPU,
and still starts a task within milliseconds).
"""

import time
from typing import Any

from pydantic import BaseModel, ConfigDict

from shared.logs import LogFormat
from shared.redis_keys import Keys

CHANNEL_TTL_MS = 3_600_000


class GroupShape(BaseModel):
    """What a worker group takes from the cluster; stages of one shape share warm groups."""

    model_config = ConfigDict(frozen=True)

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float

    @property
    def need(self) -> dict[str, float]:
        need = {"CPU": self.workers * self.cpus_per_worker}
        if self.gpus_per_worker:
            need["GPU"] = self.workers * self.gpus_per_worker
        return need

    def __str__(self) -> str:
        gpus = f" + {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else ""
        return f"{self.workers} x ({self.cpus_per_worker:g} CPU{gpus})"


class GroupConfig(BaseModel):
    """How a warm group's process starts its Ray Train run."""

    model_config = ConfigDict(frozen=True)

    group_id: str
    shape: GroupShape
    redis_url: str
    key_prefix: str
    ray_address: str
    ray_storage: str  # Ray Train's run folder for the group (it reports no checkpoints there)
    collective_timeout_s: int  # gloo/NCCL's backstop; the progress deadline acts first
    heartbeat_timeout_s: float  # the group ends when its dispatcher's heartbeat is this old
    # aetrain's log lines on the ranks (Ray keeps them with its worker logs and forwards them
    # to the group's driver), in the dispatcher's format, each naming its job and stage.
    log_format: LogFormat = "auto"
    log_level: str = "INFO"


class StageTask(BaseModel):
    """One stage of one job, as a warm group trains it."""

    model_config = ConfigDict(frozen=True)

    seq: int
    job_id: str
    token: int  # the job's fencing token: every write of the run checks it
    stage: str
    spec: dict[str, Any]
    inputs: dict[str, str]  # finished stages this one builds on -> their checkpoints
    run_folder: str  # the stage's checkpoints
    datasets_root: str
    log_path: str
    metrics_cap: int
    max_failures: int  # restarts after a crash before the stage fails
    submitted_at: float  # time.time() when the dispatcher handed it over


class StageOutcome(BaseModel):
    """How a warm group ended a task: a checkpoint, or one of the reasons it has none."""

    model_config = ConfigDict(frozen=True)

    seq: int
    checkpoint: str | None = None
    result: dict[str, float | None] = {}  # the stage's final metrics (test accuracy, ...)
    error: str | None = None
    diverged_at: int | None = None
    stopped: bool = False  # the dispatcher asked it to stop
    lease_lost: bool = False  # the job's lease is another runner's now
    start_seconds: float = 0.0  # handed over -> training (data, model, resume)
    fit_seconds: float = 0.0  # handed over -> outcome


# KEYS: channel. ARGV: seq, outcome JSON. The outcome of a task that is no longer current is
# dropped: the dispatcher moved on (or gave the group up) and must not read it as news.
_WRITE_OUTCOME = """
if redis.call('HGET', KEYS[1], 'seq') ~= ARGV[1] then return 0 end
if redis.call('HEXISTS', KEYS[1], 'outcome') == 1 then return 0 end
redis.call('HSET', KEYS[1], 'outcome', ARGV[2])
return 1
"""

# KEYS: channel. ARGV: seq. Counts a start of the current task; 0 if it is not current.
_COUNT_ATTEMPT = """
if redis.call('HGET', KEYS[1], 'seq') ~= ARGV[1] then return 0 end
return redis.call('HINCRBY', KEYS[1], 'attempts', 1)
"""


class GroupChannel:
    def __init__(self, client: Any, keys: Keys, group_id: str) -> None:
        self.redis: Any = client
        self.key = keys.group(group_id)
        self.group_id = group_id
        self._write_outcome = client.register_script(_WRITE_OUTCOME)
        self._count_attempt = client.register_script(_COUNT_ATTEMPT)
        self._wakeups: Any = None

    # -- the dispatcher's side ------------------------------------------------------------------
    def submit(self, task: StageTask) -> None:
        with self.redis.pipeline() as pipe:  # MULTI: the group never sees half a handover
            pipe.hdel(self.key, "outcome", "stop", "attempts", "error")
            pipe.hset(self.key, mapping={"seq": task.seq, "task": task.model_dump_json()})
            pipe.pexpire(self.key, CHANNEL_TTL_MS)
            pipe.publish(self.key, task.seq)
            pipe.execute()

    def outcome(self, seq: int) -> StageOutcome | None:
        raw = self.redis.hget(self.key, "outcome")
        if raw is None:
            return None
        outcome = StageOutcome.model_validate_json(raw)
        return outcome if outcome.seq == seq else None

    def request_stop(self, seq: int) -> None:
        self.redis.hset(self.key, "stop", seq)

    def beat(self, timeout_s: float) -> None:
        """The dispatcher is alive: the group keeps going for `timeout_s` more."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.key, "alive_until", int((time.time() + timeout_s) * 1000))
            pipe.pexpire(self.key, CHANNEL_TTL_MS)
            pipe.execute()

    def is_ready(self) -> bool:
        return bool(self.redis.hexists(self.key, "ready"))

    def delete(self) -> None:
        self.redis.delete(self.key)

    # -- the group's side -----------------------------------------------------------------------
    def wait_for_task(self, done: int, recheck_s: float = 1.0) -> int:
        """Block until the current task is newer than `done`; returns its seq.

        Subscribed before each look at the hash, so a task submitted in between wakes the
        read; the look every `recheck_s` covers a wake-up lost with a connection.
        """
        if self._wakeups is None:
            self._wakeups = self.redis.pubsub(ignore_subscribe_messages=True)
            self._wakeups.subscribe(self.key)
        try:
            while (seq := self.current()[0]) <= done:
                self._wakeups.get_message(timeout=recheck_s)
            return seq
        except Exception:
            self._wakeups.close()  # subscribed again on the next call, on a new connection
            self._wakeups = None
            raise

    def current(self) -> tuple[int, str | None, bool]:
        """The current seq (-1 before any task), its task JSON, and whether it has an outcome."""
        seq, task, has_outcome = self.redis.hmget(self.key, "seq", "task", "outcome")
        return (int(seq) if seq is not None else -1), task, has_outcome is not None

    def stop_requested(self, seq: int) -> bool:
        return bool(self.redis.hget(self.key, "stop") == str(seq))

    def count_attempt(self, seq: int) -> int:
        return int(self._count_attempt(keys=[self.key], args=[seq]))

    def record_error(self, seq: int, error: str) -> None:
        if self.redis.hget(self.key, "seq") == str(seq):
            self.redis.hset(self.key, "error", error[:4000])

    def last_error(self) -> str | None:
        error: str | None = self.redis.hget(self.key, "error")
        return error

    def write_outcome(self, outcome: StageOutcome) -> bool:
        """Record the outcome of the current task once; False when it is not current."""
        return bool(self._write_outcome(keys=[self.key],
                                        args=[outcome.seq, outcome.model_dump_json()]))  # fmt: skip

    def mark_ready(self) -> None:
        self.redis.hset(self.key, "ready", 1)

    def heartbeat(self) -> float | None:
        """When the dispatcher's last heartbeat runs out (epoch seconds); None if there is none."""
        until = self.redis.hget(self.key, "alive_until")
        return int(until) / 1000 if until is not None else None

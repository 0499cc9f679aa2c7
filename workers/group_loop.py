"""What every rank of a warm group runs: take a stage from the group's channel, train it, repeat.

Ray Train runs this function once per rank for the life of the group (workers/warm_group.py),
with torch imported and the process group set up once. Ray Train also restarts it, on every
rank, when a rank dies; it then finds the task in flight in the channel and trains it again
from its newest checkpoint, unless the task has used up its `max_failures` (a poison job fails
with the error a rank recorded; the group goes on).

Ranks never wait in a collective while idle (the collective timeout would end the group):
each polls the channel, and once it sees a new task, rank 0 broadcasts the one to run, or
none (it has an outcome already, was stopped, or its lease is gone).
"""

import gc
import logging
import time
import traceback
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import ray
import ray.train
import ray.train.torch
import redis
import torch
import torch.distributed as dist

from shared.group_channel import GroupChannel, GroupConfig, StageOutcome, StageTask
from shared.logs import configure_own_logging, log_context
from shared.redis_keys import Keys
from shared.store import JobStore, connect
from workers.stage_log import stage_log
from workers.train_loop import train_stage

T = TypeVar("T")

log = logging.getLogger("aetrain.group")

REDIS_RETRY_S = 0.5  # Redis down for a moment: wait for it rather than end the group


def group_loop_per_worker(config: dict[str, Any]) -> None:
    group = GroupConfig.model_validate(config)
    configure_own_logging(group.log_format, group.log_level)
    ctx = ray.train.get_context()  # [ray]
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    client = connect(group.redis_url)
    channel = GroupChannel(client, Keys(group.key_prefix), group.group_id)
    store = JobStore(client, group.key_prefix) if rank == 0 else None
    nodes = rank_nodes(world_size)
    if rank == 0:
        channel.mark_ready()
    done = -1
    while True:
        wait_for_new_task(channel, done)
        seq, task, attempt = agree_on_task(channel, store, rank, world_size)
        if task is None:
            done = max(done, seq)
            continue
        try:
            # Every line of aetrain's the rank logs meanwhile names the job and the stage.
            with log_context(job_id=task.job_id, stage=task.stage):
                log.info("rank %d of %d: start %d of the stage", rank, world_size, attempt)
                try:
                    outcome = run_task(task, attempt, rank, world_size, store, channel, nodes)
                except Exception:
                    log.exception("rank %d of %d: the stage failed", rank, world_size)
                    raise
        except Exception as exc:
            _record_error(channel, task, exc)
            if attempt > task.max_failures:
                # The last start allowed failed: the stage fails now, from whichever rank saw
                # it. decide() on the restarted group would say the same, but a group that lost
                # a node may never be placed again (its ranks wait for room in Ray).
                _fail_task(channel, task, exc, attempt)
            if world_size > 1:
                raise  # the others wait in a collective: Ray Train restarts the whole group
            continue  # one rank: run it again (its attempt is counted) without a restart
        done = task.seq
        if rank == 0:
            _retrying(partial(channel.write_outcome, outcome))
        _let_go()


def wait_for_new_task(channel: GroupChannel, done: int) -> None:
    while True:
        try:
            channel.wait_for_task(done)
            return
        except redis.RedisError:
            time.sleep(REDIS_RETRY_S)


def agree_on_task(
    channel: GroupChannel, store: JobStore | None, rank: int, world_size: int
) -> tuple[int, StageTask | None, int]:
    """The task every rank runs now as rank 0 decides it (None for none), its seq and attempt."""
    chosen: list[Any] = [(-1, None, 0)]
    if rank == 0:
        assert store is not None
        seq, task, attempt = _retrying(lambda: decide(channel, store))
        chosen = [(seq, task.model_dump_json() if task is not None else None, attempt)]
    if world_size > 1:
        dist.broadcast_object_list(chosen, src=0, device=ray.train.torch.get_device())
    seq, raw, attempt = chosen[0]
    return seq, (StageTask.model_validate_json(raw) if raw is not None else None), attempt


def decide(channel: GroupChannel, store: JobStore) -> tuple[int, StageTask | None, int]:
    """On rank 0: the current task if it should run, and which start of it this is; else its
    outcome is written, and None."""
    seq, raw, has_outcome = channel.current()
    if raw is None or has_outcome:
        return seq, None, 0
    task = StageTask.model_validate_json(raw)
    attempt = channel.count_attempt(seq)
    if attempt > task.max_failures + 1:
        error = channel.last_error() or "its worker died"
        note = f" (failed {attempt - 1} time(s); resources.max_failures is {task.max_failures})"
        channel.write_outcome(StageOutcome(seq=seq, error=error + note))
        return seq, None, attempt
    if channel.stop_requested(seq):
        channel.write_outcome(StageOutcome(seq=seq, stopped=True))
        return seq, None, attempt
    if not store.holds_lease(task.job_id, task.token):
        channel.write_outcome(StageOutcome(seq=seq, lease_lost=True))
        return seq, None, attempt
    return seq, task, attempt


def rank_nodes(world_size: int) -> list[str]:
    """The Ray node of every rank, in rank order (the stage logs say where each rank ran)."""
    node = ray.get_runtime_context().get_node_id()
    if world_size == 1:
        return [node]
    nodes: list[Any] = [None] * world_size
    dist.all_gather_object(nodes, node)
    return [str(n) for n in nodes]


def run_task(
    task: StageTask, attempt: int, rank: int, world_size: int, store: JobStore | None,
    channel: GroupChannel, nodes: list[str],
) -> StageOutcome:  # fmt: skip
    device = ray.train.torch.get_device()  # [ray]
    prepare = ray.train.torch.prepare_model  # [ray] to the device; DDP when world > 1
    if rank != 0:
        return train_stage(task, rank, world_size, device, prepare, None, None, lambda _: None)
    with stage_log(task.log_path) as say:
        say(f"stage {task.stage} of job {task.job_id} (token {task.token}): start {attempt} of "
            f"at most {task.max_failures + 1}, on {world_size} rank(s) of group "
            f"{channel.group_id}; rank nodes {' '.join(n[:12] for n in nodes)}")  # fmt: skip
        try:
            outcome = train_stage(task, rank, world_size, device, prepare, store, channel, say)
        except Exception:
            say(traceback.format_exc())
            raise
        say(f"ended: {outcome.model_dump_json(exclude={'result'})}")
        return outcome


def describe_error(exc: BaseException) -> str:
    """A readable reason: the innermost error, not a wrapper's text."""
    cause: BaseException = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    text = str(cause).strip().splitlines()
    last = text[-1] if text else ""
    return f"{type(cause).__name__}: {last}"[:2000]


def _record_error(channel: GroupChannel, task: StageTask, exc: BaseException) -> None:
    try:
        channel.record_error(task.seq, describe_error(exc))
    except redis.RedisError:
        pass


def _fail_task(channel: GroupChannel, task: StageTask, exc: BaseException, attempt: int) -> None:
    note = f" (failed {attempt} time(s); resources.max_failures is {task.max_failures})"
    try:  # written once per task: ranks that race here, or decide() later, change nothing
        channel.write_outcome(StageOutcome(seq=task.seq, error=describe_error(exc) + note))
    except redis.RedisError:
        pass  # the restarted group's decide() writes it


def _retrying(call: Callable[[], T]) -> T:
    """Redis down for a moment: wait for it rather than end the group (and every stage on it)."""
    while True:
        try:
            return call()
        except redis.RedisError:
            time.sleep(REDIS_RETRY_S)


def _let_go() -> None:
    """Return what the stage used before the next one starts."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

"""The channel between a dispatcher and a warm group, on a real Redis: an idle rank waits in a
blocking read that a submitted task ends at once."""

import threading
import time
from collections.abc import Iterator

import pytest

from shared.group_channel import GroupChannel, StageTask
from shared.store import JobStore, connect


def task(seq: int) -> StageTask:
    return StageTask(seq=seq, job_id="j1", token=1, stage="train", spec={}, inputs={},
                     run_folder="/r", datasets_root="/d", log_path="/l", metrics_cap=10,
                     max_failures=0, submitted_at=time.time())  # fmt: skip


@pytest.fixture
def channels(store: JobStore, redis_url: str) -> Iterator[tuple[GroupChannel, GroupChannel]]:
    """The dispatcher's end and a rank's end (its own connection, as in another process)."""
    dispatcher = GroupChannel(store.redis, store.keys, "g-test")
    dispatcher.delete()
    rank = GroupChannel(connect(redis_url), store.keys, "g-test")
    yield dispatcher, rank
    dispatcher.delete()  # the store fixture keeps group channels (the modules' pools own them)


def test_a_waiting_rank_wakes_on_submit_long_before_its_recheck(
    channels: tuple[GroupChannel, GroupChannel],
) -> None:
    dispatcher, rank = channels
    seen: list[tuple[int, float]] = []

    def wait() -> None:
        seen.append((rank.wait_for_task(done=-1, recheck_s=30.0), time.monotonic()))

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.5)  # the rank is blocked in its read by now
    assert not seen
    submitted_at = time.monotonic()
    dispatcher.submit(task(1))
    waiter.join(timeout=10)
    assert [seq for seq, _ in seen] == [1]
    assert seen[0][1] - submitted_at < 1.0  # woken, not found by the 30 s recheck


def test_a_task_already_there_or_newer_than_done_returns_at_once(
    channels: tuple[GroupChannel, GroupChannel],
) -> None:
    dispatcher, rank = channels
    dispatcher.submit(task(1))
    dispatcher.submit(task(2))
    started = time.monotonic()
    assert rank.wait_for_task(done=1, recheck_s=30.0) == 2
    assert time.monotonic() - started < 1.0


def test_a_wakeup_missed_is_found_by_the_recheck(
    store: JobStore, channels: tuple[GroupChannel, GroupChannel]
) -> None:
    dispatcher, rank = channels
    # Written without the publish, as if the wake-up was lost with a connection.
    store.redis.hset(dispatcher.key, mapping={"seq": 3, "task": task(3).model_dump_json()})
    seen: list[int] = []
    waiter = threading.Thread(target=lambda: seen.append(rank.wait_for_task(2, recheck_s=0.2)))
    waiter.start()
    waiter.join(timeout=10)
    assert seen == [3]


def test_an_idle_rank_costs_redis_one_read_per_recheck(
    store: JobStore, channels: tuple[GroupChannel, GroupChannel]
) -> None:
    """Not one read per 50 ms, as the poll it replaced."""
    dispatcher, rank = channels
    before = int(store.redis.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0))
    waiter = threading.Thread(target=lambda: rank.wait_for_task(done=-1, recheck_s=0.5))
    started = time.monotonic()
    waiter.start()
    time.sleep(2.0)
    dispatcher.submit(task(1))
    waiter.join(timeout=10)
    waited = time.monotonic() - started  # more than 2 s on a loaded machine
    calls = int(store.redis.info("commandstats")["cmdstat_hmget"]["calls"]) - before
    # One look per 0.5 s, plus the first and the last: ~6 for 2 s, where a 50 ms poll made 40.
    assert 3 <= calls <= waited / 0.5 + 3, (calls, waited)

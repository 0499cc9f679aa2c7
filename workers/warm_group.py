"""A warm worker group, in a process of its own that the group launcher forked.

The process is the Ray driver of one long-lived TorchTrainer run whose ranks train stage
after stage (group_loop.py). Ray Train keeps the group: it starts the workers, sets up the
process group, and restarts them all when one dies (FailureConfig); the loop then resumes
the stage in flight from its checkpoint.

A Ray job fate-shares with its driver: when this process dies (the dispatcher retires the
group, kills one that did not stop in time, or dies itself, see processes.py), Ray removes
its controller, its workers and their placement group within a second. The process also ends
itself once its dispatcher's heartbeat lapses (a dispatcher frozen by SIGSTOP or a VM pause),
so that a frozen dispatcher's group does not keep its CPUs from the runner that took over.
"""

import os
import sys
import threading
import time
from pathlib import Path

import ray
import redis
from ray.train import FailureConfig, RunConfig, ScalingConfig

from shared import locations
from shared.group_channel import GroupChannel, GroupConfig
from shared.redis_keys import Keys
from shared.store import connect
from workers.group_run import ProcessGroupConfig, group_loop_entry
from workers.stage_trainer import StageTrainer

RAY_ENV = {
    # Ray Train V2 polls its workers every 2 s by default: a dead rank was seen late. Every
    # 0.1 s cost an idle group a tenth of a core (its controller and each rank); 1 s costs
    # ~1% and a restart takes seconds anyway.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1",
    # A group waits in Ray's queue (its placement group is all or nothing) while other
    # groups let go of the CPUs the scheduler granted it; the default 60 s would fail it.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "86400",
    # Ray Train starts a PreemptionWatcher actor (a process, ~1.4 CPU-s) with every worker
    # group to relax collective timeouts while a spot node is being reclaimed. A rank lost
    # to a preemption restarts the group and resumes from its checkpoint either way; on
    # clusters of spot nodes an operator can turn it on with this same variable.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": os.environ.get(
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0"
    ),
}

HEARTBEAT_CHECK_S = 1.0
ORPHANED_EXIT = 4


def end_when_orphaned(config: GroupConfig) -> None:
    """os._exit once the dispatcher's heartbeat has lapsed, or has been missing (the channel
    deleted, Redis restarted empty) for as long; a Redis that does not answer is no news
    (the lease of the job in flight fences its writes meanwhile)."""
    channel = GroupChannel(connect(config.redis_url), Keys(config.key_prefix), config.group_id)

    def watch() -> None:
        missing_since = time.time()
        while True:
            time.sleep(HEARTBEAT_CHECK_S)
            try:
                until = channel.heartbeat()
            except redis.RedisError:
                continue
            now = time.time()
            if until is not None:
                missing_since = now
                if until > now:
                    continue
            elif now - missing_since < config.heartbeat_timeout_s:
                continue
            print(f"group {config.group_id}: the dispatcher's heartbeat lapsed; ending",
                  flush=True)  # fmt: skip
            os._exit(ORPHANED_EXIT)

    threading.Thread(target=watch, name="heartbeat-watch", daemon=True).start()


def run(config: GroupConfig) -> None:
    shape = config.shape
    # The ranks reach object storage (AETRAIN_STORAGE=s3://...) with the dispatcher's AWS
    # settings: a node of the cluster may have none of its own.
    env = {**RAY_ENV, **locations.aws_environment()}
    ray.init(address=config.ray_address, runtime_env={"env_vars": env})
    trainer = StageTrainer(
        group_loop_entry,
        train_loop_config=config.model_dump(mode="json"),
        # A rank that hangs (SIGSTOP, a dead NIC) is caught by the dispatcher's progress
        # deadline, which kills the group; the collective timeout is the backstop.
        torch_config=ProcessGroupConfig(  # type: ignore[arg-type]  # TorchConfig, torch-free
            backend="nccl" if shape.gpus_per_worker > 0 else "gloo",
            timeout_s=config.collective_timeout_s,
        ),
        scaling_config=ScalingConfig(
            num_workers=shape.workers,
            use_gpu=shape.gpus_per_worker > 0,
            resources_per_worker={
                "CPU": shape.cpus_per_worker,
                **({"GPU": shape.gpus_per_worker} if shape.gpus_per_worker else {}),
            },
        ),
        run_config=RunConfig(
            name=config.group_id,
            storage_path=config.ray_storage,
            # Unlimited here: each task counts its own restarts (group_loop.decide), so a
            # poison job fails after its max_failures and the group goes on.
            failure_config=FailureConfig(max_failures=-1),
        ),
    )
    trainer.fit()


def serve(config_path: Path) -> None:
    """The driver's life, in a process the group launcher forked (group_launcher.py)."""
    config = GroupConfig.model_validate_json(config_path.read_text())
    end_when_orphaned(config)
    run(config)


if __name__ == "__main__":  # how the launcher starts a driver where it cannot fork one
    serve(Path(sys.argv[1]))

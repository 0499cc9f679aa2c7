"""One stage's Ray Train run, in a process of its own: `python -m workers.stage_process CONFIG`.

A Ray job fate-shares with its driver: when this process dies (cancel, lost lease, dispatcher
gone), Ray removes its controller, its workers and their placement group within a second.
Run inside the dispatcher, a cancelled run left its placement group holding the CPUs.

The process also watches the job's lease itself and ends the moment it is another runner's:
its dispatcher kills it then, unless that dispatcher is frozen (SIGSTOP, a long GC or VM
pause), when nothing else would stop this run from training on beside the new owner's.
"""

import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import ray
import redis
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2._internal.callbacks.placement_group_callback import (
    PlacementGroupCleanerCallback,
)

from shared.specs import parse_job_spec
from shared.store import JobStore, connect
from workers.checkpoints import prune_run
from workers.processes import die_with_parent_from_env
from workers.tasks import checkpoints_to_keep, find_stage, lr_field
from workers.train_loop import train_loop_per_worker

RAY_ENV = {
    # Ray Train V2 drains reports every 2 s by default; a checkpoint report then cost ~2 s.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    # A stage waits in Ray's queue (its placement group is all or nothing) while stages of
    # other jobs hold the cluster; the default 60 s would fail it. A stage that can never
    # fit is refused before it starts (stage_graph.py).
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "86400",
}

LEASE_CHECK_S = 0.5  # a run that lost its lease ends within this (one GET per check)
LEASE_LOST_EXIT = 3


class StageTrainer(TorchTrainer):
    """TorchTrainer without Ray's PlacementGroupCleaner.

    The cleaner is a detached actor that removes a run's placement group if its controller
    dies; here the whole Ray job dies with this process and takes its placement groups with
    it. Without a dashboard the cleaner cannot reach the state API, and stopping it waited
    ~12 s at the end of every run.
    """

    def _create_default_callbacks(self) -> list[Any]:
        return [
            callback
            for callback in super()._create_default_callbacks()
            if not isinstance(callback, PlacementGroupCleanerCallback)
        ]


def run(config: dict[str, Any]) -> dict[str, Any]:
    spec = parse_job_spec(config["spec"])
    resources = find_stage(spec, config["stage"]).resources
    ray.init(address=config["ray_address"], runtime_env={"env_vars": RAY_ENV})
    connected_at = time.time()
    trainer = StageTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        # A rank that hangs (SIGSTOP, a dead NIC) is caught by the dispatcher's progress
        # deadline, which retries the stage; the collective timeout is the backstop that ends
        # the others' wait if the dispatcher cannot.
        torch_config=TorchConfig(timeout_s=int(2 * resources.progress_timeout_s)),
        scaling_config=ScalingConfig(
            num_workers=resources.workers,
            use_gpu=resources.gpus_per_worker > 0,
            resources_per_worker={
                "CPU": resources.cpus_per_worker,
                **({"GPU": resources.gpus_per_worker} if resources.gpus_per_worker else {}),
            },
        ),
        run_config=RunConfig(
            name=config["run_name"],
            storage_path=config["runs_root"],
            checkpoint_config=CheckpointConfig(num_to_keep=checkpoints_to_keep(spec)),
            failure_config=FailureConfig(max_failures=resources.max_failures),
        ),
    )
    result = trainer.fit()
    diverged = (result.return_value or {}).get("diverged_at")
    if diverged is not None:  # a failure, but one to report, not to retry (train_loop.py)
        stage = config["stage"]
        return {
            "error": f"training diverged at epoch {diverged} of stage {stage}: the loss is not "
            f"finite (try a lower {lr_field(spec, find_stage(spec, stage))})",
            "diverged_at": diverged,
        }
    if result.checkpoint is None:
        raise RuntimeError("training ended without a checkpoint")
    clean_up_checkpoints(config, result, checkpoints_to_keep(spec), lease_store(config))
    return {
        "checkpoint": result.checkpoint.path,
        "seconds": {
            "start": connected_at - config["spawned_at"],
            "fit": time.time() - connected_at,
        },
    }


def clean_up_checkpoints(
    config: dict[str, Any], result: Result, num_to_keep: int, store: JobStore
) -> None:
    """Partial checkpoints and extras Ray lost track of go; the run's result never does."""
    assert result.checkpoint is not None
    keep = [result.checkpoint.path, *(c.path for c, _ in result.best_checkpoints or [])]
    run_folder = Path(config["runs_root"]) / config["run_name"]
    try:
        prune_if_ours(store, config["job_id"], config["token"], run_folder, keep, num_to_keep)
    except OSError:  # housekeeping: the stage has its checkpoint, and succeeded
        traceback.print_exc()


def prune_if_ours(
    store: JobStore, job_id: str, token: int, run_folder: Path, keep: list[str], num_to_keep: int
) -> bool:
    """prune_run, only while the job's lease is `token`'s; whether it ran.

    The run folder is the job's, shared with whichever runner took the job over: a stale
    runner's cleanup would delete what the new owner's run wrote or resumes from. The window
    between the check and the deletions (well under a second) is left open: a takeover
    needs the lease to have expired first, and the new owner's run starts seconds later.
    """
    try:
        ours = store.holds_lease(job_id, token)
    except redis.RedisError as exc:
        print(f"cleanup: skipped, the lease could not be read: {exc}", flush=True)
        return False
    if not ours:
        print(f"cleanup: skipped, lease {token} is no longer this run's", flush=True)
        return False
    prune_run(run_folder, keep, num_to_keep)
    return True


def lease_store(config: dict[str, Any]) -> JobStore:
    return JobStore(connect(config["redis_url"]), config["key_prefix"])


def exit_when_lease_lost(config: dict[str, Any], outcome_path: Path) -> None:
    """End this process within LEASE_CHECK_S once the job's lease is not this run's token.

    os._exit, from a thread: the Ray job ends with this process, and with it every rank,
    before any of them trains, reports or deletes another checkpoint in the shared run
    folder. A Redis that does not answer is not a lost lease (the dispatcher's lease keeper
    judges that); once it answers, an expired lease is.
    """
    store, job_id, token = lease_store(config), config["job_id"], config["token"]

    def watch() -> None:
        while True:
            time.sleep(LEASE_CHECK_S)
            try:
                if store.holds_lease(job_id, token):
                    continue
            except redis.RedisError:
                continue
            print(f"lease {token} of job {job_id} is gone: the run ends now", flush=True)
            write_outcome(outcome_path, {"error": f"lease {token} lost", "lease_lost": True})
            os._exit(LEASE_LOST_EXIT)

    threading.Thread(target=watch, name="lease-watch", daemon=True).start()


def write_outcome(path: Path, outcome: dict[str, Any]) -> None:
    """Whole or not at all: the watch thread may end the process during the main's write."""
    partial = path.with_name(f".{path.name}.{threading.get_ident()}.partial")
    partial.write_text(json.dumps(outcome))
    os.replace(partial, path)


def main() -> None:
    die_with_parent_from_env()
    config_path = Path(sys.argv[1])
    config = json.loads(config_path.read_text())
    outcome_path = Path(config["outcome_path"])
    exit_when_lease_lost(config, outcome_path)
    try:
        outcome = run(config)
    except Exception as exc:  # the dispatcher reads the reason from the outcome file
        traceback.print_exc()
        outcome = {"error": describe_error(exc)}
    write_outcome(outcome_path, outcome)
    sys.exit(0 if "error" not in outcome else 1)


def describe_error(exc: BaseException) -> str:
    """A readable reason: the innermost training error, not Ray's wrapper text."""
    cause: BaseException = exc
    for attr in ("worker_failures",):
        failures = getattr(exc, attr, None)
        if isinstance(failures, dict) and failures:
            cause = next(iter(failures.values()))
    while cause.__cause__ is not None:
        cause = cause.__cause__
    text = str(cause).strip().splitlines()
    last = text[-1] if text else ""
    return f"{type(cause).__name__}: {last}"[:2000]


if __name__ == "__main__":
    main()

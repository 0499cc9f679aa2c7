"""One stage's training on one rank of a warm group: plain DDP PyTorch.

The same loop trains every kind of stage; what differs (model, data, loss, evaluation) is
the stage's Task (tasks.py). The group (group_loop.py) calls `train_stage` once per task, so
everything a stage uses is built here, from its task alone, and dropped when it returns:
one job never sees another's data, model, optimizer or random state.

Checkpoints are written by rank 0 straight into the stage's run folder (manifest last, then
renamed into place whole), each one only while the job's lease is still this run's token.
"""

import math
import random
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler, TensorDataset

from shared import locations
from shared.group_channel import GroupChannel, StageOutcome, StageTask
from shared.metrics import json_safe
from shared.specs import parse_job_spec
from shared.store import JobStore
from workers.batches import IndexedBatches
from workers.checkpoints import latest_valid_checkpoint, prune_run, restore, save_checkpoint, unwrap
from workers.tasks import build_task, checkpoints_to_keep, find_stage, init_seed, lr_field

STOP_CHECK_S = 0.25  # a stop request or a lost lease ends the stage within this (+ a batch)

Say = Callable[[str], None]


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float) -> Any:
    # Frozen parameters (a semisupervised head on a fixed encoder) are not optimized.
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    optimizer = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return optimizer(params, lr=lr, weight_decay=weight_decay)


class StopWatch:
    """Whether the stage must end now: its dispatcher asked, or the job's lease is gone.

    Rank 0 reads Redis from a thread; every rank asks `should_stop()` at the same points of
    the loop, which all-reduces the answer, so the ranks leave together and none waits in a
    collective for one that left.
    """

    def __init__(
        self, channel: GroupChannel | None, store: JobStore | None, task: StageTask,
        world_size: int, device: torch.device,
    ) -> None:  # fmt: skip
        self.task, self.world_size, self.device = task, world_size, device
        self.reason: str | None = None  # "stopped" or "lease_lost", on rank 0
        self._done = threading.Event()
        if channel is not None and store is not None:
            self._thread = threading.Thread(target=self._watch, args=(channel, store),
                                            name="stop-watch", daemon=True)  # fmt: skip
            self._thread.start()

    def _watch(self, channel: GroupChannel, store: JobStore) -> None:
        while not self._done.wait(STOP_CHECK_S):
            try:  # Redis down for a moment is no reason to stop; the dispatcher judges that
                if channel.stop_requested(self.task.seq):
                    self.reason = "stopped"
                elif not store.holds_lease(self.task.job_id, self.task.token):
                    self.reason = "lease_lost"
            except redis.RedisError:
                continue
            if self.reason:
                return

    def lease_lost(self) -> None:
        self.reason = "lease_lost"

    def should_stop(self) -> bool:
        flag = 1.0 if self.reason else 0.0
        if self.world_size == 1:
            return bool(flag)
        vote = torch.tensor([flag], device=self.device)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX)
        return bool(vote.item() > 0)

    def close(self) -> None:
        self._done.set()


def seed_everything(seed: int) -> None:
    """Every random stream a stage may draw from, so no stage inherits another's state."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_stage(
    task: StageTask,
    rank: int,
    world_size: int,
    device: torch.device,
    prepare: Callable[[nn.Module], nn.Module],
    store: JobStore | None,
    channel: GroupChannel | None,
    say: Say,
) -> StageOutcome:
    """Train the task's stage to its end, or until it must stop; rank 0's outcome is the one.

    `prepare` moves a model to `device` and wraps it for DDP when world_size > 1 (Ray's
    prepare_model on a group; bench/gpu_loop.py passes its own under torchrun, without Ray).
    `store` and `channel` are rank 0's (None elsewhere): the metrics, the lease and the stop
    requests go through them; without them nothing is published and no lease is checked.
    """
    spec = parse_job_spec(task.spec)
    stage = find_stage(spec, task.stage)

    seed_everything(init_seed(spec))  # the same initial weights on every rank
    built = build_task(spec, stage, task.inputs, task.datasets_root)
    training = built.training
    seed_everything(training.seed + rank)  # per-rank stream for noise and projections

    train_set = [torch.from_numpy(a) for a in built.arrays]
    n_train = len(train_set[0])
    # batch_size is global: each of the world_size ranks takes its share of every step.
    sampler = DistributedSampler(
        TensorDataset(*train_set), num_replicas=world_size, rank=rank, shuffle=True,
        seed=training.seed,
    )  # fmt: skip
    per_rank_batch = max(1, training.batch_size // world_size)
    train_batches = IndexedBatches(train_set, sampler, per_rank_batch, device)

    model = prepare(built.model)
    optimizer = make_optimizer(model, training.optimizer, training.lr, training.weight_decay)
    run_folder = task.run_folder
    folder = latest_valid_checkpoint(run_folder, say if rank == 0 else None)
    start_epoch = restore(folder, model, optimizer) if folder is not None else 0
    if folder is None and rank == 0:
        say("resume: no whole checkpoint, from epoch 0")
    training_at = time.time()

    watch = StopWatch(channel, store, task, world_size, device)
    spec_json = spec.model_dump_json()
    keep = checkpoints_to_keep(spec)
    checkpoint = folder

    def ended(**fields: Any) -> StageOutcome:
        return StageOutcome(seq=task.seq, start_seconds=training_at - task.submitted_at,
                            fit_seconds=time.time() - task.submitted_at, **fields)  # fmt: skip

    try:
        for epoch in range(start_epoch, training.epochs):
            epoch_started = time.perf_counter()
            sampler.set_epoch(epoch)  # else every epoch repeats one order
            model.train()
            loss_sum, batches = torch.zeros(2, device=device), 0
            for batch in train_batches:
                if watch.should_stop():
                    return ended(**{watch.reason or "stopped": True})
                loss = built.loss(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum[0] += loss.detach()
                batches += 1
            loss_sum[1] = batches
            if world_size > 1:
                dist.all_reduce(loss_sum)
            train_loss = float(loss_sum[0] / loss_sum[1])

            if rank == 0 and store is not None:
                seconds = time.perf_counter() - epoch_started
                metrics = {
                    "train_loss": train_loss,
                    **built.evaluate(unwrap(model)),
                    "epoch_seconds": seconds,
                    "samples_per_s": n_train / seconds,
                }
                if not publish(store, task, epoch, metrics):
                    watch.lease_lost()
            if not math.isfinite(train_loss):
                # A diverged run stays diverged: more epochs (or restarts from a checkpoint)
                # cannot bring it back. The loss is all-reduced, so every rank ends here, at
                # the same epoch, and the diverged weights are never checkpointed.
                say(f"diverged: train_loss {train_loss} at epoch {epoch}")
                error = (f"training diverged at epoch {epoch} of stage {task.stage}: the loss is "
                         f"not finite (try a lower {lr_field(spec, stage)})")  # fmt: skip
                return ended(error=error, diverged_at=epoch)
            if watch.should_stop():
                return ended(**{watch.reason or "stopped": True})
            is_last = epoch == training.epochs - 1
            if rank == 0 and (is_last or (epoch + 1) % training.checkpoint_every == 0):
                saved = write_checkpoint(task, store, run_folder, model, optimizer, epoch,
                                         spec_json, keep, say)  # fmt: skip
                if saved is None:
                    watch.lease_lost()
                else:
                    checkpoint = saved
        if watch.should_stop():  # the last checkpoint was refused: the lease is gone
            return ended(**{watch.reason or "stopped": True})
    finally:
        watch.close()
    if rank != 0:
        return ended()
    if checkpoint is None:  # zero epochs and nothing to resume from
        raise RuntimeError("training ended without a checkpoint")
    net = unwrap(model)
    net.eval()
    with torch.enable_grad():  # the contractive penalty takes gradients
        result = json_safe(built.final(net))
    return ended(checkpoint=checkpoint, result=result)


def publish(store: JobStore, task: StageTask, epoch: int, metrics: dict[str, float]) -> bool:
    """Send one epoch's metrics (a NaN or inf as null); False only when the lease is lost."""
    try:
        return store.record_progress(task.job_id, task.token, task.stage, epoch,
                                     json_safe(metrics), cap=task.metrics_cap)  # fmt: skip
    except redis.RedisError:  # Redis down for a moment: this epoch's line is lost, not the run
        return True


def write_checkpoint(
    task: StageTask,
    store: JobStore | None,
    run_folder: str,
    model: nn.Module,
    optimizer: Any,
    epoch: int,
    spec_json: str,
    keep: int,
    say: Say,
) -> str | None:
    """Save the epoch's checkpoint into the run folder, whole or not at all; None if the lease
    is no longer this run's (the run folder is the job's: a new owner may be writing it).

    On a disk the checkpoint is written into a hidden folder and renamed into place once the
    lease is checked; on object storage, which has no rename, it is written under a name no
    other run uses (epoch, token, time), and its manifest, written last and only once the
    lease is checked, makes it whole. The window between the lease check and the rename or
    the manifest (milliseconds) is left open: a takeover needs the lease to have expired
    first, and the new owner's run starts seconds later.
    """
    if locations.is_remote(run_folder):
        final = locations.join(run_folder, f"checkpoint_{epoch:06d}-{task.token}-{time.time_ns()}")
        # The lease is read after the state's upload, before the manifest that commits it.
        if save_checkpoint(final, model, optimizer, epoch, spec_json,
                           vouch=lambda: lease_is(store, task)) is None:  # fmt: skip
            say(f"checkpoint of epoch {epoch} not written: lease {task.token} is gone")
            locations.remove_tree(final)
            return None
    else:
        folder = Path(run_folder)
        folder.mkdir(parents=True, exist_ok=True)
        local = folder / f"checkpoint_{epoch:06d}"
        with tempfile.TemporaryDirectory(dir=folder, prefix=".partial-") as tmp:
            save_checkpoint(tmp, model, optimizer, epoch, spec_json)  # manifest last
            if not lease_is(store, task):
                say(f"checkpoint of epoch {epoch} not written: lease {task.token} is gone")
                return None
            if local.exists():  # a run resumed from before this epoch wrote it already
                local = folder / f"checkpoint_{epoch:06d}-{task.token}-{time.time_ns()}"
            Path(tmp).rename(local)
            Path(tmp).mkdir()  # for TemporaryDirectory's cleanup
        final = str(local)
    prune_run(run_folder, [final], keep - 1, say)  # the `keep` newest, this one among them
    return final


def lease_is(store: JobStore | None, task: StageTask) -> bool:
    if store is None:
        return True
    try:
        return store.holds_lease(task.job_id, task.token)
    except redis.RedisError:  # cannot tell: write it; the manifest vouches only for whole files
        return True

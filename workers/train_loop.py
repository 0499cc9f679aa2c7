"""The per-rank training loop that Ray Train launches: plain DDP PyTorch, Ray's lines marked.

The same loop trains every kind of stage; what differs (model, data, loss, evaluation) is
the stage's Task (tasks.py).
"""

import math
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import redis
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from shared.errors import LeaseLost
from shared.metrics import json_safe
from shared.specs import parse_job_spec
from shared.store import JobStore, connect
from workers.checkpoints import (
    latest_valid_checkpoint,
    restore,
    save_checkpoint,
    unwrap,
    verify,
)
from workers.tasks import build_task, find_stage, init_seed


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float) -> Any:
    # Frozen parameters (a semisupervised head on a fixed encoder) are not optimized.
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    optimizer = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return optimizer(params, lr=lr, weight_decay=weight_decay)


def publish(store: JobStore, config: dict[str, Any], epoch: int,
            metrics: dict[str, float]) -> bool:  # fmt: skip
    """Send one epoch's metrics (a NaN or inf as null); False only when the lease is lost."""
    try:
        return store.record_progress(
            config["job_id"], config["token"], config["stage"], epoch, json_safe(metrics),
            cap=config["metrics_cap"],
        )  # fmt: skip
    except redis.RedisError:  # Redis down for a moment: this epoch's line is lost, not the run
        return True


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Train the stage; returns None, or {"diverged_at": epoch} when its loss stopped being finite.

    Ray Train hands rank 0's return value to the driver (Result.return_value).
    """
    spec = parse_job_spec(config["spec"])
    ctx = ray.train.get_context()  # [ray]
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()  # [ray]

    torch.manual_seed(init_seed(spec))  # the same initial weights on every rank
    stage = find_stage(spec, config["stage"])
    task = build_task(spec, stage, config["inputs"], Path(config["datasets_root"]))
    training = task.training
    torch.manual_seed(training.seed + rank)  # per-rank stream for noise and projections

    train_set = TensorDataset(*(torch.from_numpy(a) for a in task.arrays))
    # batch_size is global: each of the world_size ranks takes its share of every step.
    sampler = DistributedSampler(
        train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=training.seed
    )
    per_rank_batch = max(1, training.batch_size // world_size)
    train_loader = DataLoader(train_set, batch_size=per_rank_batch, sampler=sampler)

    model = ray.train.torch.prepare_model(task.model)  # [ray] to device, DDP when world > 1
    optimizer = make_optimizer(model, training.optimizer, training.lr, training.weight_decay)

    say = partial(print, flush=True) if rank == 0 else None  # one rank's account is enough
    start_epoch = resume(config, model, optimizer, say)

    store = JobStore(connect(config["redis_url"]), config["key_prefix"]) if rank == 0 else None
    spec_json = spec.model_dump_json()
    for epoch in range(start_epoch, training.epochs):
        started = time.perf_counter()
        sampler.set_epoch(epoch)  # else every epoch repeats one order
        model.train()
        loss_sum, batches = torch.zeros(2, device=device), 0
        for batch in train_loader:
            loss = task.loss(model, [t.to(device) for t in batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum[0] += loss.detach()
            batches += 1
        loss_sum[1] = batches
        if world_size > 1:
            dist.all_reduce(loss_sum)
        train_loss = float(loss_sum[0] / loss_sum[1])
        is_last = epoch == training.epochs - 1
        is_checkpoint = is_last or (epoch + 1) % training.checkpoint_every == 0

        if rank == 0 and store is not None:
            seconds = time.perf_counter() - started
            metrics = {
                "train_loss": train_loss,
                **task.evaluate(unwrap(model)),
                "epoch_seconds": seconds,
                "samples_per_s": len(train_set) / seconds,
            }
            if not publish(store, config, epoch, metrics):
                raise LeaseLost(config["job_id"], config["token"])
        if not math.isfinite(train_loss):
            # A diverged run stays diverged: more epochs (or Ray's restarts from a checkpoint,
            # which a raise here would cost, max_failures times) cannot bring it back. The
            # loss is all-reduced, so every rank returns here, at the same epoch, and the
            # diverged weights are never checkpointed.
            if say:
                say(f"diverged: train_loss {train_loss} at epoch {epoch}")
            return {"diverged_at": epoch}
        if is_checkpoint:
            report_checkpoint(rank, model, optimizer, epoch, spec_json)
    if start_epoch >= training.epochs > 0:
        # Resumed from the final checkpoint: report it again, as Ray's snapshot may not hold
        # it (a crash between the copy and the snapshot), and the stage's result is Ray's latest.
        report_checkpoint(rank, model, optimizer, start_epoch - 1, spec_json)
    return None


def report_checkpoint(
    rank: int, model: nn.Module, optimizer: Any, epoch: int, spec_json: str
) -> None:
    # ray.train.report is a barrier of all ranks and costs ~2 s on Ray's default health
    # check interval, so it is called only with a checkpoint; metrics go to Redis.
    with tempfile.TemporaryDirectory() as tmp:
        saved = None
        if rank == 0:
            save_checkpoint(tmp, model, optimizer, epoch, spec_json)  # manifest last
            saved = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"epoch": epoch}, checkpoint=saved)  # [ray]


def resume(
    config: dict[str, Any], model: nn.Module, optimizer: Any, say: Callable[[str], None] | None
) -> int:
    """Load the newest whole checkpoint of this run, if any; returns the epoch to start from.

    Every rank reads the same files and so picks the same checkpoint. Ray's own pick is
    only a fallback (a run folder this worker cannot list) and is checked as well.
    """
    run_folder = Path(config["runs_root"]) / config["run_name"]
    folder = latest_valid_checkpoint(run_folder, say)
    if folder is not None:
        return restore(folder, model, optimizer)
    checkpoint = ray.train.get_checkpoint()  # [ray] set when resuming a run
    if checkpoint is not None:
        with checkpoint.as_directory() as ray_folder:
            if verify(ray_folder):
                if say:
                    say(f"resume: from Ray's checkpoint {checkpoint.path}")
                return restore(ray_folder, model, optimizer)
            if say:
                say(f"resume: skipped Ray's checkpoint {checkpoint.path}: not whole")
    if say:
        say("resume: no whole checkpoint, from epoch 0")
    return 0

"""The per-rank training loop that Ray Train launches: plain DDP PyTorch, Ray's lines marked."""

import tempfile
import time
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from shared.errors import LeaseLost
from shared.specs import ObjectiveSpec, parse_job_spec
from shared.store import JobStore, connect
from workers.checkpoints import restore, save_checkpoint, unwrap
from workers.data import build_datasets
from workers.losses import reconstruction_loss
from workers.models import DenseAutoencoder, build_model
from workers.objectives import (
    contractive_closed_form,
    contractive_estimate,
    corrupt,
    sparsity_penalty,
)


def compute_loss(model: nn.Module, xb: torch.Tensor, objective: ObjectiveSpec) -> torch.Tensor:
    """Reconstruction of the clean input from a (maybe corrupted) one, plus regularizers."""
    raw = unwrap(model)
    x_in = corrupt(xb, objective.denoising) if objective.denoising else xb
    x_hat, h = model(x_in)  # through the DDP wrapper, so gradients are all-reduced
    loss = reconstruction_loss(x_hat, xb, objective.loss)
    if objective.sparsity:
        loss = loss + sparsity_penalty(h, objective.sparsity)
    if objective.contractive:
        term = objective.contractive
        linear = raw.first_layer_if_single_sigmoid() if isinstance(raw, DenseAutoencoder) else None
        if linear is not None:
            penalty = contractive_closed_form(h, linear.weight)
        else:
            penalty = contractive_estimate(raw.encoder, x_in, term.projections)
        loss = loss + term.weight * penalty
    return loss


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, objective: ObjectiveSpec) -> dict[str, float]:
    """Validation reconstruction error; with denoising also from corrupted inputs (seeded)."""
    model.eval()
    raw = unwrap(model)
    x_hat, _ = raw(x)
    metrics = {"val_mse": float(torch.mean((x_hat - x) ** 2))}
    if objective.loss == "bce":
        metrics["val_bce"] = float(reconstruction_loss(x_hat, x, "bce"))
    if objective.denoising:
        generator = torch.Generator(device=x.device).manual_seed(0)
        x_noisy_hat, _ = raw(corrupt(x, objective.denoising, generator))
        metrics["val_mse_corrupted"] = float(torch.mean((x_noisy_hat - x) ** 2))
    return metrics


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float) -> Any:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    optimizer = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return optimizer(model.parameters(), lr=lr, weight_decay=weight_decay)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    spec = parse_job_spec(config["spec"])
    training = spec.training
    ctx = ray.train.get_context()  # [ray]
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()  # [ray]
    torch.manual_seed(training.seed + rank)  # per-rank stream for anything random

    split = build_datasets(spec.data)
    train_set = TensorDataset(torch.from_numpy(split.x_train))
    # batch_size is global: each of the world_size ranks takes its share of every step.
    sampler = DistributedSampler(
        train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=training.seed
    )
    per_rank_batch = max(1, training.batch_size // world_size)
    train_loader = DataLoader(train_set, batch_size=per_rank_batch, sampler=sampler)
    x_val = torch.from_numpy(split.x_val).to(device)

    torch.manual_seed(training.seed)  # the same initial weights on every rank
    model = build_model(spec.model, spec.data.input_shape, spec.objective.loss)
    model = ray.train.torch.prepare_model(model)  # [ray] move to device, DDP when world > 1
    optimizer = make_optimizer(model, training.optimizer, training.lr, training.weight_decay)

    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()  # [ray] set when resuming a run
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start_epoch = restore(folder, model, optimizer)

    store = JobStore(connect(config["redis_url"]), config["key_prefix"]) if rank == 0 else None
    spec_json = spec.model_dump_json()
    for epoch in range(start_epoch, training.epochs):
        started = time.perf_counter()
        sampler.set_epoch(epoch)  # else every epoch repeats one order
        model.train()
        loss_sum, batches = torch.zeros(2, device=device), 0
        for (xb,) in train_loader:
            xb = xb.to(device)
            loss = compute_loss(model, xb, spec.objective)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum[0] += loss.detach()
            batches += 1
        loss_sum[1] = batches
        if world_size > 1:
            dist.all_reduce(loss_sum)
        is_last = epoch == training.epochs - 1
        is_checkpoint = is_last or (epoch + 1) % training.checkpoint_every == 0

        if rank == 0 and store is not None:
            seconds = time.perf_counter() - started
            metrics = {
                "train_loss": float(loss_sum[0] / loss_sum[1]),
                **evaluate(model, x_val, spec.objective),
                "epoch_seconds": seconds,
                "samples_per_s": len(train_set) / seconds,
            }
            if not store.record_progress(
                config["job_id"], config["token"], config["stage"], epoch, metrics
            ):
                raise LeaseLost(config["job_id"], config["token"])
        if is_checkpoint:
            # ray.train.report is a barrier of all ranks and costs ~2 s on Ray's default health
            # check interval, so it is called only with a checkpoint; metrics go to Redis above.
            with tempfile.TemporaryDirectory() as tmp:
                saved = None
                if rank == 0:
                    save_checkpoint(tmp, model, optimizer, epoch, spec_json)
                    saved = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report({"epoch": epoch}, checkpoint=saved)  # [ray]

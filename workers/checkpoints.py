"""Checkpoints: {model, optimizer, epoch, spec} in one file, loaded without unpickling code."""

from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT_FILE = "state.pt"


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (nanoGPT's raw_model)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def save_checkpoint(
    folder: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    spec_json: str,
) -> Path:
    path = Path(folder) / CHECKPOINT_FILE
    state = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "spec": spec_json,  # the checkpoint records how it was made
    }
    torch.save(state, path)
    return path


def load_state(folder: str | Path) -> dict[str, Any]:
    # weights_only: a checkpoint in shared storage is data, never code to run.
    state: dict[str, Any] = torch.load(
        Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True
    )
    return state


def restore(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load a checkpoint into model and optimizer; returns the epoch to start from."""
    state = load_state(folder)
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"]) + 1

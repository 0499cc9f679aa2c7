"""Objectives as pure functions of tensors."""

import torch
from torch.nn import functional as F

_BCE_EPS = 1e-7


def reconstruction_loss(x_hat: torch.Tensor, x: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean reconstruction loss over batch and features; bce expects x_hat in (0, 1)."""
    if loss == "bce":
        # Validation inputs normalized with training min/max may step just outside [0, 1].
        # Written out rather than F.binary_cross_entropy, which raises on a NaN input: a
        # diverged run must give a NaN loss, which the train loop reports as divergence.
        p, target = x_hat.clamp(_BCE_EPS, 1 - _BCE_EPS), x.clamp(0.0, 1.0)
        return -(target * torch.log(p) + (1 - target) * torch.log1p(-p)).mean()
    return F.mse_loss(x_hat, x)

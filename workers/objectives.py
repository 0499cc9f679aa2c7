"""The regularizers of the lecture's autoencoders, as pure functions of tensors.

sparsity (KL or L1 on the code), denoising (corrupt the input, score against the clean one)
and contraction (the squared Frobenius norm of the encoder's Jacobian).
"""

from collections.abc import Callable

import torch
from torch import nn

from shared.specs import (
    DenoisingSpec,
    GaussianNoiseSpec,
    KLSparsitySpec,
    MaskingNoiseSpec,
    ObjectiveSpec,
    SparsitySpec,
)
from workers.checkpoints import unwrap
from workers.losses import reconstruction_loss
from workers.models import DenseAutoencoder

_EPS = 1e-6


def kl_sparsity(h: torch.Tensor, rho: float) -> torch.Tensor:
    """sum_j KL(rho || rho_hat_j), rho_hat_j the batch mean of code unit j in (0, 1)."""
    rho_hat = h.mean(dim=0).clamp(_EPS, 1 - _EPS)  # (B, K) -> (K,)
    kl = rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))
    return kl.sum()


def l1_sparsity(h: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of sum_j |h_j|."""
    return h.abs().sum(dim=1).mean()


def sparsity_penalty(h: torch.Tensor, spec: SparsitySpec) -> torch.Tensor:
    if isinstance(spec, KLSparsitySpec):
        return spec.weight * kl_sparsity(h, spec.target)
    return spec.weight * l1_sparsity(h)


def corrupt(
    x: torch.Tensor, spec: DenoisingSpec, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A corrupted copy of x (B, D): gaussian noise, masking to 0, or salt and pepper."""
    if isinstance(spec, GaussianNoiseSpec):
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + spec.std * noise
    hit = torch.rand(x.shape, generator=generator, device=x.device) < spec.fraction
    if isinstance(spec, MaskingNoiseSpec):
        return x.masked_fill(hit, 0.0)
    # salt and pepper: each hit pixel becomes the lowest or the highest value, half and half
    salt = torch.rand(x.shape, generator=generator, device=x.device) < 0.5
    low, high = x.min().detach(), x.max().detach()
    return torch.where(hit, torch.where(salt, high, low), x)


def contractive_closed_form(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean ||J||_F^2 of h = sigmoid(W x + b): sum_j (h_j (1 - h_j))^2 sum_i W_ji^2.

    h: (B, K) codes, weight: (K, D).
    """
    return ((h * (1 - h)) ** 2 @ (weight**2).sum(dim=1)).mean()


def contractive_estimate(
    encoder: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, projections: int
) -> torch.Tensor:
    """Unbiased estimate of mean ||J||_F^2: E_v ||J^T v||^2 with v ~ N(0, I) in code space.

    The input gradient is taken out of place (autograd.grad with create_graph), so the caller
    still makes one ordinary backward(): DDP does not support a second backward through its
    wrapper (pytorch#63812).
    """
    x = x.detach().requires_grad_(True)
    h = encoder(x)  # (B, K)
    total = x.new_zeros(())
    for _ in range(projections):
        v = torch.randn_like(h)
        (jt_v,) = torch.autograd.grad(h, x, grad_outputs=v, create_graph=True)  # (B, D)
        total = total + jt_v.pow(2).sum(dim=1).mean()
    return total / projections


def jacobian_frobenius(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Exact per-sample ||J_f(x)||_F, one backward pass per code unit: (B, D) -> (B,)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        h = encoder(x)
        squares = torch.zeros(len(x), device=x.device, dtype=x.dtype)
        for j in range(h.shape[1]):
            # Samples are independent, so d(sum_b h_bj)/dx_b is row j of sample b's Jacobian.
            (row,) = torch.autograd.grad(h[:, j].sum(), x, retain_graph=True)
            squares += row.pow(2).sum(dim=1)
    return squares.sqrt()


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
def evaluate_reconstruction(
    model: nn.Module, x: torch.Tensor, objective: ObjectiveSpec
) -> dict[str, float]:
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

"""The autoencoder, built from a model spec; the decoder mirrors the encoder."""

import torch
from torch import nn
from torch.nn import functional as F

from shared.specs import DenseModelSpec

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "linear": nn.Identity,
}


class TiedLinear(nn.Module):
    """A decoder layer that reuses an encoder layer's weight, transposed."""

    def __init__(self, encoder_layer: nn.Linear) -> None:
        super().__init__()
        self.encoder_layer = encoder_layer
        self.bias = nn.Parameter(torch.zeros(encoder_layer.in_features))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.encoder_layer.weight.t(), self.bias)


class Autoencoder(nn.Module):
    def __init__(self, spec: DenseModelSpec, input_dim: int, output_activation: str) -> None:
        super().__init__()
        sizes = [input_dim, *spec.hidden, spec.latent_dim]
        encoder_linears = [nn.Linear(a, b) for a, b in zip(sizes, sizes[1:], strict=False)]
        encoder: list[nn.Module] = []
        for i, linear in enumerate(encoder_linears):
            is_code = i == len(encoder_linears) - 1
            encoder += [linear, ACTIVATIONS[spec.code_activation if is_code else spec.activation]()]
        decoder: list[nn.Module] = []
        for i, linear in enumerate(reversed(encoder_linears)):
            is_output = i == len(encoder_linears) - 1
            layer = (
                TiedLinear(linear)
                if spec.tied
                else nn.Linear(linear.out_features, linear.in_features)
            )
            decoder += [layer, ACTIVATIONS[output_activation if is_output else spec.activation]()]
        self.encoder = nn.Sequential(*encoder)
        self.decoder = nn.Sequential(*decoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))  # (B, D) -> (B, D)


class NormalizedEncoder(nn.Module):
    """The exported encoder: raw inputs in, codes out (the training normalization built in)."""

    def __init__(self, encoder: nn.Module, shift: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("shift", shift)
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder((x - self.shift) / self.scale)  # (B, D) -> (B, latent_dim)


def output_activation(loss: str) -> str:
    """bce scores probabilities, so its decoder ends in a sigmoid; mse is unbounded."""
    return "sigmoid" if loss == "bce" else "linear"

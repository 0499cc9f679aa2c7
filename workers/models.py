"""Autoencoders built from a model spec: dense and convolutional; the decoder mirrors the encoder.

Every model takes and returns flat (B, D) batches, so losses, PCA and normalization are the
same for all; a conv model reshapes to (B, C, H, W) inside.
"""

import torch
from torch import nn
from torch.nn import functional as F

from shared.specs import ConvModelSpec, DenseModelSpec, transposed_out

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
    """encoder: (B, D) -> (B, K) codes; decoder: (B, K) -> (B, D); forward returns both."""

    encoder: nn.Module
    decoder: nn.Module

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.decoder(h), h


class DenseAutoencoder(Autoencoder):
    def __init__(self, spec: DenseModelSpec, input_dim: int, output_activation: str) -> None:
        super().__init__()
        sizes = [input_dim, *spec.hidden, spec.latent_dim]
        linears = [nn.Linear(a, b) for a, b in zip(sizes, sizes[1:], strict=False)]
        encoder: list[nn.Module] = []
        for i, linear in enumerate(linears):
            is_code = i == len(linears) - 1
            encoder += [linear, ACTIVATIONS[spec.code_activation if is_code else spec.activation]()]
        decoder: list[nn.Module] = []
        for i, linear in enumerate(reversed(linears)):
            is_output = i == len(linears) - 1
            layer = (
                TiedLinear(linear)
                if spec.tied
                else nn.Linear(linear.out_features, linear.in_features)
            )
            decoder += [layer, ACTIVATIONS[output_activation if is_output else spec.activation]()]
        self.encoder = nn.Sequential(*encoder)
        self.decoder = nn.Sequential(*decoder)

    def first_layer_if_single_sigmoid(self) -> nn.Linear | None:
        """The encoder's only Linear when it is one sigmoid layer (closed-form contraction)."""
        layers = list(self.encoder)
        if len(layers) == 2 and isinstance(layers[1], nn.Sigmoid):
            linear = layers[0]
            return linear if isinstance(linear, nn.Linear) else None
        return None


class Reshape(nn.Module):
    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape((x.shape[0], *self.shape))


class ConvAutoencoder(Autoencoder):
    def __init__(
        self, spec: ConvModelSpec, input_shape: tuple[int, ...], output_activation: str
    ) -> None:
        super().__init__()
        shapes = spec.feature_shapes(input_shape)  # (C, H, W) per layer, input first
        k, s, p = spec.kernel_size, spec.stride, spec.padding
        act = ACTIVATIONS[spec.activation]
        encoder: list[nn.Module] = [Reshape(*shapes[0])]
        for (c_in, _, _), (c_out, _, _) in zip(shapes, shapes[1:], strict=False):
            encoder += [nn.Conv2d(c_in, c_out, k, stride=s, padding=p), act()]
        flat = shapes[-1][0] * shapes[-1][1] * shapes[-1][2]
        encoder += [nn.Flatten(), nn.Linear(flat, spec.latent_dim),
                    ACTIVATIONS[spec.code_activation]()]  # fmt: skip
        decoder: list[nn.Module] = [nn.Linear(spec.latent_dim, flat), act(), Reshape(*shapes[-1])]
        mirrored = list(reversed(shapes))
        for i, ((c_in, h, w), (c_out, h_out, w_out)) in enumerate(
            zip(mirrored, mirrored[1:], strict=False)
        ):
            padding_out = (h_out - transposed_out(h, k, s, p), w_out - transposed_out(w, k, s, p))
            is_output = i == len(mirrored) - 2
            decoder += [
                nn.ConvTranspose2d(
                    c_in, c_out, k, stride=s, padding=p, output_padding=padding_out
                ),  # fmt: skip
                ACTIVATIONS[output_activation]() if is_output else act(),
            ]
        decoder.append(nn.Flatten())
        self.encoder = nn.Sequential(*encoder)
        self.decoder = nn.Sequential(*decoder)


def build_model(
    spec: DenseModelSpec | ConvModelSpec, input_shape: tuple[int, ...], loss: str
) -> Autoencoder:
    if isinstance(spec, ConvModelSpec):
        return ConvAutoencoder(spec, input_shape, output_activation(loss))
    dim = 1
    for n in input_shape:
        dim *= n
    return DenseAutoencoder(spec, dim, output_activation(loss))


class NormalizedEncoder(nn.Module):
    """An exported module (encoder or classifier): raw inputs in, the training normalization
    built in."""

    def __init__(self, encoder: nn.Module, shift: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("shift", shift)
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)  # images (B, C, H, W) or flat (B, D)
        return self.encoder((x - self.shift) / self.scale)  # (B, D) -> (B, latent_dim)


class ExportedAutoencoder(nn.Module):
    """encode(raw) -> codes and decode(codes) -> raw, for interpolation in code space."""

    def __init__(self, model: Autoencoder, shift: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.encoder = model.encoder
        self.decoder = model.decoder
        self.register_buffer("shift", shift)
        self.register_buffer("scale", scale)

    @torch.jit.export
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder((x.reshape(x.shape[0], -1) - self.shift) / self.scale)

    @torch.jit.export
    def decode(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(h) * self.scale + self.shift  # (B, K) -> (B, D), raw units

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def output_activation(loss: str) -> str:
    """bce scores probabilities, so its decoder ends in a sigmoid; mse is unbounded."""
    return "sigmoid" if loss == "bce" else "linear"

"""A stacked autoencoder assembled from the one-layer autoencoders of its stages."""

import torch
from torch import nn

from shared.specs import LayerSpec
from workers.checkpoints import load_state
from workers.models import Autoencoder, DenseAutoencoder, output_activation


def layer_model(layer: LayerSpec, input_dim: int, below: LayerSpec | None) -> DenseAutoencoder:
    """The one-layer autoencoder that stage `layer` trains on its input (the codes of the layer
    `below`, or the data for the first layer).

    Its decoder ends in the activation of the codes it reconstructs: stacked, the decoders then
    form a nonlinear decoder. With a linear output on every layer the whole stack's decoder
    was one linear map of the code, so it could never reconstruct better than PCA.
    """
    output = below.activation if below is not None else output_activation(layer.objective.loss)
    return DenseAutoencoder(layer.as_model(), input_dim, output)


class StackedAutoencoder(Autoencoder):
    """encoder: layer 1 .. N encoders; decoder: layer N .. 1 decoders."""

    def __init__(self, layers: list[DenseAutoencoder]) -> None:
        super().__init__()
        self.encoder = nn.Sequential(*[m for layer in layers for m in layer.encoder])
        self.decoder = nn.Sequential(*[m for layer in reversed(layers) for m in layer.decoder])


def build_stack(
    layers: tuple[LayerSpec, ...], input_dim: int, checkpoints: list[str] | None = None
) -> StackedAutoencoder:
    """The stack of `layers`, each loaded from its stage checkpoint when given."""
    models = []
    for i, layer in enumerate(layers):
        below = layers[i - 1] if i else None
        model = layer_model(layer, below.units if below else input_dim, below)
        if checkpoints is not None:
            model.load_state_dict(load_state(checkpoints[i])["model"])
        models.append(model)
    return StackedAutoencoder(models)


@torch.no_grad()
def encode_through(layers: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """The codes of frozen encoders applied in order: the input of the next layer."""
    for layer in layers:
        x = layer(x)
    return x

"""A stacked autoencoder assembled from the one-layer autoencoders of its stages."""

import torch
from torch import nn

from shared.specs import LayerSpec
from workers.checkpoints import load_state
from workers.models import Autoencoder, DenseAutoencoder, output_activation


def layer_model(layer: LayerSpec, input_dim: int) -> DenseAutoencoder:
    """The one-layer autoencoder that stage `layer` trains on its input."""
    return DenseAutoencoder(layer.as_model(), input_dim, output_activation(layer.objective.loss))


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
        model = layer_model(layer, input_dim if i == 0 else layers[i - 1].units)
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

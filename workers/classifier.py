"""The classifier of a semisupervised job: an encoder (pretrained, or none) and an MLP head."""

import torch
from torch import nn


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, code_dim: int, hidden: tuple[int, ...],
                 classes: int) -> None:  # fmt: skip
        super().__init__()
        sizes = [code_dim, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes, sizes[1:], strict=False):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], classes))
        self.encoder = encoder
        self.head = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))  # (B, D) -> (B, classes) logits


def freeze(module: nn.Module) -> nn.Module:
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(dim=1) == y).float().mean())

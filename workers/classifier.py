"""The classifiers of a semisupervised job, and how each method uses the unlabeled inputs.

    mlp              an encoder (pretrained, or none) and an MLP head, on the labeled subset
    joint            the same, with the pretrained decoder kept: one network trained on the
                     reconstruction of every input plus the classification of the labeled ones
    label_spreading  labels spread over a k-NN graph of the codes (spread_labels), then the
                     head trained on every input that got a confident label
"""

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from workers.losses import reconstruction_loss

if TYPE_CHECKING:
    from scipy import sparse


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


class JointClassifier(nn.Module):
    """A classifier that also reconstructs: `classifier` is what is exported and scored.

    One forward takes both batches, so that under DDP every parameter (the decoder's and the
    head's) gets its gradient from the one backward that follows it.
    """

    def __init__(self, classifier: Classifier, decoder: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier
        self.decoder = decoder

    def forward(
        self, x: torch.Tensor, x_labeled: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.classifier.encoder(torch.cat([x, x_labeled]))  # (B + L, D) -> (B + L, K)
        n = len(x)
        return self.decoder(h[:n]), self.classifier.head(h[n:])  # (B, D), (L, classes)


def joint_loss(
    x_hat: torch.Tensor, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
    weight: float, loss: str,
) -> torch.Tensor:  # fmt: skip
    """Cross-entropy of the labeled batch + weight * reconstruction loss of the other."""
    return F.cross_entropy(logits, y) + weight * reconstruction_loss(x_hat, x, loss)


def scoring_model(model: nn.Module) -> nn.Module:
    """The part of a stage's model that maps inputs to logits."""
    return model.classifier if isinstance(model, JointClassifier) else model


def freeze(module: nn.Module) -> nn.Module:
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(dim=1) == y).float().mean())


def knn_affinity(codes: np.ndarray, neighbors: int) -> "sparse.csr_matrix":
    """W: a symmetric k-NN graph with heat-kernel weights exp(-(d / sigma)^2), sigma the
    median distance to a neighbor (so the weights do not depend on the codes' scale)."""
    # Imported here: every rank imports this module, and only label spreading needs them
    # (~1 CPU-s at each rank's start on 2 cores).
    from scipy import sparse
    from sklearn.neighbors import kneighbors_graph

    graph = kneighbors_graph(codes, neighbors, mode="distance", include_self=False)
    sigma = float(np.median(graph.data)) or 1.0
    graph.data = np.exp(-((graph.data / sigma) ** 2))
    return sparse.csr_matrix(graph.maximum(graph.T))  # i near j or j near i


def spread_labels(
    codes: np.ndarray, labels: np.ndarray, classes: int, neighbors: int, alpha: float
) -> np.ndarray:
    """(N, classes) scores of label spreading (Zhou et al. 2004), in closed form:
    F = (1 - alpha) (I - alpha S)^-1 Y, S = D^-1/2 W D^-1/2; `labels` is -1 where unknown.

    Each row is normalized to sum to 1 (a confidence per class); a point that no labeled
    point reaches has a row of zeros.
    """
    from scipy import sparse
    from scipy.sparse.linalg import spsolve

    w = knn_affinity(codes, neighbors)
    degree = np.asarray(w.sum(axis=1)).ravel()
    d = sparse.diags(1.0 / np.sqrt(np.maximum(degree, 1e-12)))
    s = d @ w @ d
    y = np.zeros((len(codes), classes))
    known = labels >= 0
    y[known, labels[known]] = 1.0
    system = sparse.csc_matrix(sparse.identity(len(codes)) - alpha * s)
    scores = np.asarray(spsolve(system, (1 - alpha) * y)).reshape(len(codes), classes)
    scores = np.maximum(scores, 0.0)  # rounding may leave -1e-17 where 0 is meant
    total = scores.sum(axis=1, keepdims=True)
    return np.divide(scores, total, out=np.zeros_like(scores), where=total > 0)


def pseudo_labels(
    scores: np.ndarray, labels: np.ndarray, min_confidence: float
) -> tuple[np.ndarray, np.ndarray]:
    """(indices, labels) to train on: the known labels as they are, and every other point's
    spread label whose confidence is at least min_confidence (and above zero)."""
    confidence = scores.max(axis=1)
    spread = scores.argmax(axis=1)
    known = labels >= 0
    keep = known | ((confidence >= min_confidence) & (confidence > 0))
    chosen = np.flatnonzero(keep)
    return chosen, np.where(known, labels, spread)[chosen].astype(np.int64)

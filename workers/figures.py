"""The pictures of a finished job: reconstructions.png and latent.png (matplotlib, no display)."""

from pathlib import Path
from typing import BinaryIO

import matplotlib

matplotlib.use("Agg")  # no display on a worker
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _as_images(x: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray | None:
    if len(input_shape) != 3 or input_shape[0] != 1:
        return None
    return x.reshape(len(x), input_shape[1], input_shape[2])


def save_reconstructions(
    path: Path | BinaryIO,
    rows: list[tuple[str, np.ndarray]],
    input_shape: tuple[int, ...],
) -> None:
    """Originals over reconstructions (and noisy inputs): images as a grid, vectors as lines."""
    count = len(rows[0][1])
    fig, axes = plt.subplots(len(rows), count, figsize=(1.2 * count, 1.3 * len(rows)),
                             squeeze=False)  # fmt: skip
    for r, (label, x) in enumerate(rows):
        images = _as_images(x, input_shape)
        for c in range(count):
            ax = axes[r][c]
            if images is not None:
                ax.imshow(images[c], cmap="gray", vmin=0.0, vmax=1.0)
            else:
                ax.bar(range(x.shape[1]), x[c])
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(label, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80, format="png")
    plt.close(fig)


def save_latent(path: Path, codes: np.ndarray, labels: np.ndarray | None) -> None:
    """Codes projected to 2-D (their first two principal components), coloured by label."""
    centered = codes - codes.mean(axis=0)
    if codes.shape[1] > 2:
        _, _, vt = np.linalg.svd(centered, full_matrices=False)
        points = centered @ vt[:2].T
    else:
        points = np.pad(centered, ((0, 0), (0, 2 - codes.shape[1])))
    fig, ax = plt.subplots(figsize=(5, 4.5))
    if labels is not None:
        scatter = ax.scatter(points[:, 0], points[:, 1], s=6, c=labels, cmap="tab10")
        fig.colorbar(scatter, ax=ax, label="label")
    else:
        ax.scatter(points[:, 0], points[:, 1], s=6)
    ax.set_title("codes, first two principal components")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)

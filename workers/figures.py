"""The pictures of a finished job (reconstructions.png, latent.png, curves.png) and the
interpolation strip, bounded whatever the data's size.

Every sample is shrunk before it is drawn: an image to at most 64x64 pixels (block means), a
vector of at most 64 values to bars, a longer one to the min, mean and max of at most 128 equal
bins (a band and a line). At most 16 panels a row and 8 rows, at 80 dpi: no picture is larger
than about 1600x900 pixels or draws more than 128 things a panel, so a (50, 65536) upload costs
what digits costs. The latent scatter shows at most 5,000 codes.

Figures are built as `matplotlib.figure.Figure` on their own Agg canvas, never with pyplot:
pyplot keeps global state (the current figure, the registry of open ones) that threads share,
and the API draws in its threadpool and the dispatcher in its finalize threads. A Figure and
its canvas are touched by one thread only.

curves.png has one panel per stage (at most 11: a stacked pretraining of 8 layers, its
fine-tune, the head and the baseline), 3 panels a row: at most 1008x960 pixels.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MAX_SIDE = 64  # pixels of an image panel's data, per side
MAX_BARS = 64  # a longer vector is drawn as a band of bins
MAX_BINS = 128
MAX_COLUMNS = 16  # panels a row
MAX_ROWS = 8
MAX_POINTS = 5000  # codes in the latent scatter
DPI = 80
PANEL_INCHES = (1.2, 1.3)  # width, height: 96 x 104 pixels
LABEL_INCHES = 0.35
CURVE_COLUMNS = 3  # stage panels a row in curves.png
CURVE_INCHES = (4.2, 3.0)  # width, height of one stage panel: 336 x 240 pixels


@dataclass(frozen=True)
class Thumbnails:
    """Samples shrunk for drawing: images (N, h, w), bars (N, D) or bands (N, 3, bins)."""

    kind: Literal["image", "bars", "band"]
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: slice) -> "Thumbnails":
        return Thumbnails(self.kind, self.values[index])

    def scaled_to_unit(self) -> "Thumbnails":
        """Values mapped to 0..1 over all samples (images are drawn with black 0, white 1)."""
        low, high = float(self.values.min()), float(self.values.max())
        shown = (self.values - low) / (high - low) if high > low else self.values * 0
        return Thumbnails(self.kind, shown)


def shrink(x: np.ndarray, input_shape: tuple[int, ...]) -> Thumbnails:
    """(N, D) samples as few numbers as a panel shows; the work is one pass over x."""
    x = x.reshape(len(x), -1)
    if len(input_shape) == 3:  # (C, H, W): channels averaged, then block means
        images = x.reshape(len(x), *input_shape).mean(axis=1)
        return Thumbnails("image", _block_means(images))
    if x.shape[1] <= MAX_BARS:
        return Thumbnails("bars", x)
    edges = np.linspace(0, x.shape[1], min(MAX_BINS, x.shape[1]) + 1).astype(np.int64)[:-1]
    counts = np.diff(np.append(edges, x.shape[1]))
    band = np.stack(
        [
            np.minimum.reduceat(x, edges, axis=1),
            np.add.reduceat(x, edges, axis=1) / counts,
            np.maximum.reduceat(x, edges, axis=1),
        ],
        axis=1,
    )  # (N, 3, bins)
    return Thumbnails("band", band)


def _block_means(images: np.ndarray) -> np.ndarray:
    """(N, H, W) -> (N, h, w) with h, w <= MAX_SIDE; edge rows that fill no block are dropped."""
    _, height, width = images.shape
    factor = -(-max(height, width) // MAX_SIDE)
    if factor == 1:
        return images
    h, w = max(1, height // factor), max(1, width // factor)
    fh, fw = min(factor, height), min(factor, width)
    cropped = images[:, : h * fh, : w * fw]
    return cropped.reshape(len(images), h, fh, w, fw).mean(axis=(2, 4))


def concatenate(parts: list[Thumbnails]) -> Thumbnails:
    return Thumbnails(parts[0].kind, np.concatenate([p.values for p in parts]))


def save_panels(path: Path | BinaryIO, rows: list[tuple[str, Thumbnails]]) -> None:
    """One row of panels per (label, thumbnails), at most MAX_COLUMNS x MAX_ROWS, as a PNG."""
    rows = [(label, thumbs[:MAX_COLUMNS]) for label, thumbs in rows[:MAX_ROWS]]
    columns = max(len(thumbs) for _, thumbs in rows)
    width = LABEL_INCHES + PANEL_INCHES[0] * columns
    fig = Figure(figsize=(width, PANEL_INCHES[1] * len(rows)), dpi=DPI)
    FigureCanvasAgg(fig)
    # Fixed margins: tight_layout measures every axes, seconds for 64 of them.
    fig.subplots_adjust(left=LABEL_INCHES / width, right=0.99, bottom=0.02, top=0.98,
                        wspace=0.08, hspace=0.08)  # fmt: skip
    if all(thumbs.kind == "image" for _, thumbs in rows):
        # One axes a row, its images side by side in one picture: an axes costs ~8 ms to make
        # and draw, and 48 of them were most of a job's finalize.
        for r, (label, thumbs) in enumerate(rows):
            ax = fig.add_subplot(len(rows), 1, r + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.imshow(side_by_side(thumbs.values, columns), cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_ylabel(label, fontsize=8)
        fig.savefig(path, format="png")
        return
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for r, (label, thumbs) in enumerate(rows):
        for c in range(columns):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(thumbs):
                ax.set_axis_off()
            elif thumbs.kind == "image":
                ax.imshow(thumbs.values[c], cmap="gray", vmin=0.0, vmax=1.0)
            elif thumbs.kind == "bars":  # one filled step patch: ax.bar makes a patch a bar
                ax.stairs(thumbs.values[c], fill=True)
            else:
                low, mean, high = thumbs.values[c]
                ax.fill_between(np.arange(len(mean)), low, high, alpha=0.35, linewidth=0)
                ax.plot(mean, linewidth=0.8)
        axes[r][0].set_ylabel(label, fontsize=8)
    fig.savefig(path, format="png")


def side_by_side(images: np.ndarray, columns: int) -> np.ndarray:
    """(N, h, w) images as one (h, columns * (w + 1) - 1) picture, white between and after."""
    count, height, width = images.shape
    row = np.ones((height, columns, width + 1), dtype=np.float32)
    row[:, :count, :width] = images.transpose(1, 0, 2)
    return row.reshape(height, -1)[:, :-1]


def save_reconstructions(
    path: Path | BinaryIO,
    rows: list[tuple[str, np.ndarray]],
    input_shape: tuple[int, ...],
) -> None:
    """Originals over reconstructions (and noisy inputs): images as a grid, vectors as bars or
    as bands of bins."""
    save_panels(path, [(label, shrink(x[:MAX_COLUMNS], input_shape)) for label, x in rows])


def save_latent(path: Path | BinaryIO, codes: np.ndarray, labels: np.ndarray | None) -> None:
    """Codes projected to 2-D (their first two principal components), coloured by label."""
    if len(codes) > MAX_POINTS:  # evenly spaced, so the same job draws the same picture
        keep = np.linspace(0, len(codes) - 1, MAX_POINTS).astype(np.int64)
        codes, labels = codes[keep], None if labels is None else labels[keep]
    centered = codes - codes.mean(axis=0)
    if codes.shape[1] > 2:
        points = centered @ _top_components(centered, 2).T
    else:
        points = np.pad(centered, ((0, 0), (0, 2 - codes.shape[1])))
    fig = Figure(figsize=(5, 4.5), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if labels is not None:
        scatter = ax.scatter(points[:, 0], points[:, 1], s=6, c=labels, cmap="tab10")
        fig.colorbar(scatter, ax=ax, label="label")
    else:
        ax.scatter(points[:, 0], points[:, 1], s=6)
    ax.set_title("codes, first two principal components")
    fig.tight_layout()
    fig.savefig(path, format="png")


def _top_components(centered: np.ndarray, k: int) -> np.ndarray:
    """(k, K) leading principal directions of (n, K) centered codes.

    Exact SVD up to K = 32; past it a seeded randomized range finder (Halko et al.) with power
    iterations. For 5,000 codes on 2 cores: K = 512 takes 0.28 s exact, 0.013 s randomized;
    K = 8192 takes 88 s exact, 0.25 s randomized. The probe has the codes' dtype: a float64
    one would cast all of (n, K) to float64 at every product.
    """
    if centered.shape[1] <= 32:
        return np.linalg.svd(centered, full_matrices=False)[2][:k]
    probe = np.random.default_rng(0).standard_normal((centered.shape[1], k + 8), np.float32)
    basis = np.linalg.qr(centered @ probe)[0]  # (n, k + 8)
    for _ in range(4):  # power iterations sharpen the leading directions
        basis = np.linalg.qr(centered @ (centered.T @ basis))[0]
    return np.linalg.svd(basis.T @ centered, full_matrices=False)[2][:k]


def curve_series(rows: list[dict[str, Any]]) -> list[str]:
    """The per-epoch metrics curves.png draws: train_loss, then every val_* one, as first seen."""
    seen = dict.fromkeys(key for row in rows for key in row if key.startswith("val_"))
    has_train = any("train_loss" in row for row in rows)
    return ["train_loss", *seen] if has_train else list(seen)


def curves_figure(history: list[dict[str, Any]], stages: Sequence[str] = ()) -> Figure:
    """Train and validation metrics per epoch, one panel per stage that has any, in the order
    of `stages` (the job's plan) and then by name. Losses share the left axis, logarithmic
    where they span a decade or more; accuracies go on a right axis from 0 to 1."""
    by_stage: dict[str, list[dict[str, Any]]] = {}
    for row in history:
        by_stage.setdefault(row["stage"], []).append(row)
    order = {name: i for i, name in enumerate(stages)}
    names = sorted(by_stage, key=lambda name: (order.get(name, len(order)), name))
    columns = max(1, min(len(names), CURVE_COLUMNS))
    rows = max(1, -(-len(names) // CURVE_COLUMNS))
    fig = Figure(figsize=(CURVE_INCHES[0] * columns, CURVE_INCHES[1] * rows), dpi=DPI)
    FigureCanvasAgg(fig)
    if not names:
        fig.text(0.5, 0.5, "no epochs recorded", ha="center", va="center")
        return fig
    # Fixed margins, in inches, so any grid keeps room for its labels: tight_layout measures
    # every axes (11 panels took 1.4 s with it, 0.85 s without; one panel 0.14 s, 0.08 s).
    width, height = fig.get_size_inches()
    right = 0.75 if any(key.endswith("accuracy") for row in history for key in row) else 0.25
    fig.subplots_adjust(left=0.75 / width, right=1 - right / width, bottom=0.5 / height,
                        top=1 - 0.35 / height, wspace=0.55, hspace=0.5)  # fmt: skip
    for i, name in enumerate(names):
        _draw_stage(fig.add_subplot(rows, columns, i + 1), name, by_stage[name])
    return fig


def save_curves(
    path: Path | BinaryIO, history: list[dict[str, Any]], stages: Sequence[str] = ()
) -> None:
    """curves.png: `curves_figure` as a PNG."""
    curves_figure(history, stages).savefig(path, format="png")


def _draw_stage(ax: Axes, name: str, rows: list[dict[str, Any]]) -> None:
    rows = sorted(rows, key=lambda row: row["epoch"])
    epochs = np.array([row["epoch"] for row in rows])
    marker = "o" if len(rows) == 1 else None  # else a single epoch draws nothing
    accuracy_ax: Axes | None = None
    losses: list[np.ndarray] = []
    for key in curve_series(rows):
        # A metric that was not finite is stored as None: a gap in the line.
        values = np.array([_number(row.get(key)) for row in rows], dtype=np.float64)
        style = "-" if key.startswith("train_") else "--"
        if key.endswith("accuracy"):
            if accuracy_ax is None:
                accuracy_ax = ax.twinx()
                accuracy_ax.set_ylim(0.0, 1.02)  # 1.0 not on the frame
                accuracy_ax.set_ylabel("accuracy")
            accuracy_ax.plot(epochs, values, style, color="tab:green", marker=marker, label=key)
        else:
            ax.plot(epochs, values, style, marker=marker, label=key)
            losses.append(values)
    drawn = np.concatenate(losses) if losses else np.empty(0)
    finite = drawn[np.isfinite(drawn)]
    if len(finite) and finite.min() > 0 and finite.max() >= 10 * finite.min():
        ax.set_yscale("log")
    ax.set_title(name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    handles, labels = ax.get_legend_handles_labels()
    if accuracy_ax is not None:
        more = accuracy_ax.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    # Losses fall to the lower right and accuracies rise to the upper right.
    where = "upper right" if accuracy_ax is None else "right"
    if handles:
        ax.legend(handles, labels, fontsize=8, loc=where)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else float("nan")

"""Decode points on the line between the codes of two validation samples."""

import io
from pathlib import Path

import numpy as np
import torch

from workers.figures import save_reconstructions


class CodeRangeError(ValueError):
    """A sample index outside the validation split."""

    def __init__(self, field: str, index: int, count: int) -> None:
        super().__init__(field, index, count)
        self.field, self.index, self.count = field, index, count

    def __str__(self) -> str:
        return f"{self.field}: {self.index} is not a validation sample (0..{self.count - 1})"


def interpolate(folder: Path, a: int, b: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes (steps, K), outputs (steps, D) in raw input units) from sample a to sample b."""
    codes = np.load(folder / "val_codes.npy", allow_pickle=False)
    for field, index in (("a", a), ("b", b)):
        if not 0 <= index < len(codes):
            raise CodeRangeError(field, index, len(codes))
    t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None]
    line = (1 - t) * codes[a] + t * codes[b]  # (steps, K)
    model = torch.jit.load(str(folder / "autoencoder.pt"))
    with torch.no_grad():
        outputs = model.decode(torch.from_numpy(line)).numpy()
    return line, outputs


def png_strip(outputs: np.ndarray, input_shape: tuple[int, ...]) -> bytes:
    """The decoded points as one row of images (or bar plots), as PNG bytes."""
    low, high = float(outputs.min()), float(outputs.max())
    shown = (outputs - low) / (high - low) if high > low else outputs * 0
    buffer = io.BytesIO()
    save_reconstructions(buffer, [("a -> b", shown)], input_shape)
    return buffer.getvalue()

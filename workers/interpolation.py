"""Decode points on the line between the codes of two validation samples.

The decoder is rebuilt from the job's spec and loaded from safetensors: the API process never
loads a TorchScript or pickle file from storage, which would run whatever it holds.
"""

import io
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model

from shared.specs import AnyJobSpec, AutoencoderSpec, StackedSpec
from workers.figures import save_reconstructions
from workers.models import ExportedAutoencoder, build_model
from workers.stack import build_stack


class CodeRangeError(ValueError):
    """A sample index outside the validation split."""

    def __init__(self, field: str, index: int, count: int) -> None:
        super().__init__(field, index, count)
        self.field, self.index, self.count = field, index, count

    def __str__(self) -> str:
        return f"{self.field}: {self.index} is not a validation sample (0..{self.count - 1})"


def exported_autoencoder(spec: AnyJobSpec, folder: Path) -> ExportedAutoencoder:
    """The job's autoencoder with its normalization, from `autoencoder.safetensors`."""
    if isinstance(spec, AutoencoderSpec):
        model = build_model(spec.model, spec.data.input_shape, spec.objective.loss)
    elif isinstance(spec, StackedSpec):
        model = build_stack(spec.layers, spec.data.input_dim)
    else:
        raise ValueError(f"a {spec.kind} job has no autoencoder to interpolate with")
    dim = spec.data.input_dim
    exported = ExportedAutoencoder(model, torch.zeros(dim), torch.ones(dim))
    load_model(exported, str(folder / "autoencoder.safetensors"))
    return exported.eval()


def interpolate(
    spec: AnyJobSpec, folder: Path, a: int, b: int, steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """(codes (steps, K), outputs (steps, D) in raw input units) from sample a to sample b."""
    codes = np.load(folder / "val_codes.npy", allow_pickle=False)
    for field, index in (("a", a), ("b", b)):
        if not 0 <= index < len(codes):
            raise CodeRangeError(field, index, len(codes))
    t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None]
    line = (1 - t) * codes[a] + t * codes[b]  # (steps, K)
    model = exported_autoencoder(spec, folder)
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

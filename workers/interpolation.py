"""Decode points on the line between the codes of two validation samples.

The decoder is rebuilt from the job's spec and loaded from safetensors: the API process never
loads a TorchScript or pickle file from storage, which would run whatever it holds.

What one request costs is bounded: the JSON reply by MAX_REPLY_VALUES numbers (checked before
decoding), the PNG by the panels of workers/figures.py, decoded a few steps at a time.
"""

import io
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model

from shared.specs import AnyJobSpec, AutoencoderSpec, StackedSpec
from workers.figures import MAX_COLUMNS, concatenate, save_panels, shrink
from workers.models import ExportedAutoencoder, build_model
from workers.stack import build_stack

# A JSON reply holds at most this many numbers (codes + outputs): about 6 MB of text, which
# pydantic and the client parse in well under a second. Larger replies are refused (422 on
# `steps`), never cut: a caller who reads `outputs` must get every value it asked for.
MAX_REPLY_VALUES = 2**18
# Values decoded at once for a PNG: a (64, 1048576) strip is decoded a few steps at a time
# and shrunk at once, so the API never holds all of it.
DECODE_VALUES = 2**22


class InterpolationRefused(ValueError):
    """A request the API answers with 422 naming `field`."""

    field = ""


class CodeRangeError(InterpolationRefused):
    """A sample index outside the validation split."""

    def __init__(self, field: str, index: int, count: int) -> None:
        super().__init__(field, index, count)
        self.field, self.index, self.count = field, index, count

    def __str__(self) -> str:
        return f"{self.field}: {self.index} is not a validation sample (0..{self.count - 1})"


class ReplyTooLarge(InterpolationRefused):
    """More numbers than a JSON reply holds."""

    field = "steps"

    def __init__(self, steps: int, per_step: int, limit: int) -> None:
        super().__init__(steps, per_step, limit)
        self.steps, self.per_step, self.limit = steps, per_step, limit

    def __str__(self) -> str:
        fits = self.limit // self.per_step
        ask = f"ask for at most {fits} steps, or" if fits >= 2 else "ask for"
        return (
            f"steps: {self.steps} steps of {self.per_step} numbers (code and output) are "
            f"{self.steps * self.per_step}; a JSON reply holds at most {self.limit}: {ask} "
            "format=png, which draws any size"
        )


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


def code_line(folder: Path, a: int, b: int, steps: int) -> np.ndarray:
    """(steps, K) codes on the line from validation sample a to sample b."""
    codes = np.load(folder / "val_codes.npy", mmap_mode="r", allow_pickle=False)  # two rows read
    for field, index in (("a", a), ("b", b)):
        if not 0 <= index < len(codes):
            raise CodeRangeError(field, index, len(codes))
    t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None]
    line: np.ndarray = (1 - t) * np.asarray(codes[a]) + t * np.asarray(codes[b])
    return line.astype(np.float32)


def interpolate(
    spec: AnyJobSpec,
    folder: Path,
    a: int,
    b: int,
    steps: int,
    max_values: int = MAX_REPLY_VALUES,
) -> tuple[np.ndarray, np.ndarray]:
    """(codes (steps, K), outputs (steps, D) in raw input units) from sample a to sample b;
    ReplyTooLarge, before decoding, past `max_values` numbers in all."""
    line = code_line(folder, a, b, steps)
    per_step = line.shape[1] + spec.data.input_dim
    if steps * per_step > max_values:
        raise ReplyTooLarge(steps, per_step, max_values)
    model = exported_autoencoder(spec, folder)
    with torch.no_grad():
        outputs = model.decode(torch.from_numpy(line)).numpy()
    return line, outputs


def interpolation_png(spec: AnyJobSpec, folder: Path, a: int, b: int, steps: int) -> bytes:
    """The decoded points from sample a to sample b as rows of shrunk panels, as PNG bytes."""
    line = code_line(folder, a, b, steps)
    model = exported_autoencoder(spec, folder)
    batch = max(1, DECODE_VALUES // spec.data.input_dim)
    parts = []
    with torch.no_grad():
        for start in range(0, steps, batch):
            outputs = model.decode(torch.from_numpy(line[start : start + batch])).numpy()
            parts.append(shrink(outputs, spec.data.input_shape))
    shown = concatenate(parts).scaled_to_unit()
    rows = [(f"{a} -> {b}" if start == 0 else "", shown[start : start + MAX_COLUMNS])
            for start in range(0, len(shown), MAX_COLUMNS)]  # fmt: skip
    buffer = io.BytesIO()
    save_panels(buffer, rows)
    return buffer.getvalue()

"""Interpolation decodes with weights from safetensors, rebuilt from the spec: the same
outputs as the exported TorchScript, which the API never loads."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from shared.specs import StackedSpec, parse_job_spec
from tests.specs import digits_spec
from workers.artifacts import ArtifactWriter
from workers.data import build_datasets
from workers.interpolation import interpolate
from workers.models import build_model
from workers.stack import build_stack

STACKED = {"kind": "stacked", "data": {"dataset": "digits"},
           "layers": [{"units": 16}, {"units": 6}]}  # fmt: skip


@pytest.mark.parametrize(
    "spec",
    [
        {**digits_spec(), "model": {"hidden": [32], "latent_dim": 8}},
        {**digits_spec(), "model": {"arch": "conv", "channels": [4, 8], "latent_dim": 8}},
        {**digits_spec(), "model": {"hidden": [16], "latent_dim": 4, "tied": True}},
        STACKED,
    ],
    ids=["dense", "conv", "tied", "stacked"],
)
def test_interpolation_matches_the_exported_torchscript(
    spec: dict[str, Any], tmp_path: Path
) -> None:
    job_spec = parse_job_spec(spec)
    torch.manual_seed(0)
    if isinstance(job_spec, StackedSpec):
        model = build_stack(job_spec.layers, job_spec.data.input_dim)
    else:
        model = build_model(job_spec.model, job_spec.data.input_shape, "mse")
    writer = ArtifactWriter(tmp_path, build_datasets(job_spec.data))
    writer.autoencoder(model.eval(), None, job_spec.data.input_shape)
    assert {"autoencoder.safetensors", "autoencoder.pt", "val_codes.npy"} <= set(writer.names)

    codes, outputs = interpolate(job_spec, tmp_path, 0, 3, 5)
    assert codes.shape[0] == 5 and outputs.shape == (5, 64)
    scripted = torch.jit.load(str(tmp_path / "autoencoder.pt"))
    expected = scripted.decode(torch.from_numpy(codes)).detach().numpy()
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-6)

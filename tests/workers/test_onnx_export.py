"""encoder.onnx: for every model the examples train, the file the workers write gives the
codes encoder.pt gives, on the same batch of raw inputs, at any batch size. No Ray."""

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from torch import nn

from shared.specs import (
    AnyJobSpec,
    AutoencoderSpec,
    PretrainAutoencoderSpec,
    StackedSpec,
    parse_job_spec,
)
from workers.artifacts import ArtifactWriter
from workers.classifier import freeze
from workers.models import build_model
from workers.onnx_export import INPUT, OUTPUT, onnx_bytes
from workers.stack import build_stack
from workers.tasks import job_split

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))
# What the examples do not show: a stacked pretraining, and GELU (ONNX has it as Erf).
OTHERS: dict[str, dict[str, Any]] = {
    "semisupervised-stacked-pretrain": {
        "kind": "semisupervised", "data": {"dataset": "digits"}, "labeled_fraction": 0.05,
        "pretrain": {"kind": "stacked", "layers": [{"units": 32, "activation": "sigmoid"},
                                                   {"units": 16, "activation": "tanh"}]},
        "head": {"hidden": [16]},
    },
    "dense-gelu": {
        "kind": "autoencoder", "data": {"dataset": "digits"},
        "model": {"arch": "dense", "hidden": [32], "latent_dim": 8, "activation": "gelu",
                  "code_activation": "tanh"},
    },
}  # fmt: skip
SPECS = {path.stem: path for path in EXAMPLES} | OTHERS
TOLERANCE = 1e-4


def example_spec(source: Path | dict[str, Any]) -> AnyJobSpec:
    document = yaml.safe_load(source.read_text()) if isinstance(source, Path) else source
    return parse_job_spec(document)


def encoder_of(spec: AnyJobSpec) -> nn.Module:
    """The encoder finalize exports for `spec` (workers/results.py), with random weights."""
    torch.manual_seed(0)
    if isinstance(spec, AutoencoderSpec):
        return build_model(spec.model, spec.data.input_shape, spec.objective.loss).encoder
    if isinstance(spec, StackedSpec):
        return build_stack(spec.layers, spec.data.input_dim).encoder
    # semisupervised: the pretrained encoder, frozen unless finetune_encoder (tasks.py)
    pretrain = spec.pretrain
    if isinstance(pretrain, PretrainAutoencoderSpec):
        encoder = build_model(pretrain.model, spec.data.input_shape, pretrain.objective.loss)
        return freeze(encoder.encoder)
    return freeze(build_stack(pretrain.layers, spec.data.input_dim).encoder)


def test_every_example_kind_and_arch_is_covered() -> None:
    specs = [example_spec(path) for path in EXAMPLES]
    kinds = {spec.kind for spec in specs}
    archs = {spec.model.arch for spec in specs if isinstance(spec, AutoencoderSpec)}
    assert kinds == {"autoencoder", "stacked", "semisupervised"}
    assert archs == {"dense", "conv"}


@pytest.mark.parametrize("name", SPECS)
def test_onnx_encoder_gives_the_torchscript_codes_on_the_same_batch(
    name: str, tmp_path: Path
) -> None:
    spec = example_spec(SPECS[name])
    split = job_split(spec, None)
    writer = ArtifactWriter(tmp_path, split)
    writer.encoder(encoder_of(spec))
    assert {"encoder.pt", "encoder.safetensors", "encoder.onnx"} <= set(writer.names)

    session = ort.InferenceSession(
        str(tmp_path / "encoder.onnx"), providers=["CPUExecutionProvider"]
    )
    (given,), (codes,) = session.get_inputs(), session.get_outputs()
    assert (given.name, given.shape) == (INPUT, ["batch", split.input_dim])
    assert codes.name == OUTPUT and codes.shape[0] == "batch"
    scripted = torch.jit.load(str(tmp_path / "encoder.pt"))
    norm = split.normalization
    worst = 0.0
    # Raw inputs (the exported files build the normalization in), at batch sizes other than
    # the two rows the export traced with: the batch dimension really is dynamic.
    for rows in (1, 7, len(split.x_val)):
        x = (split.x_val[:rows] * norm.scale + norm.shift).astype(np.float32)  # (B, D)
        (onnx_codes,) = session.run([OUTPUT], {INPUT: x})
        with torch.no_grad():
            expected = scripted(torch.from_numpy(x)).numpy()
        assert onnx_codes.shape == expected.shape == (rows, expected.shape[1])
        worst = max(worst, float(np.abs(onnx_codes - expected).max()))
    print(f"{name}: max |onnx - torchscript| = {worst:.3g} over {len(split.x_val)} rows")
    assert worst < TOLERANCE


def test_encoders_exported_from_several_threads_at_once_are_each_whole() -> None:
    """A dispatcher finalizes its jobs in threads; torch's exporter keeps global state."""
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(0)
    modules = [nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)) for _ in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        exported = list(pool.map(lambda m: onnx_bytes(m, 8), modules))
    batch = np.random.default_rng(0).random((5, 8), dtype=np.float32)
    for module, model in zip(modules, exported, strict=True):
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        (codes,) = session.run(None, {"x": batch})
        with torch.no_grad():
            expected = module(torch.from_numpy(batch)).numpy()
        assert np.abs(codes - expected).max() < 1e-5


SCRIPT_IN_THREADS = """
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from workers.export_lock import script
from workers.models import NormalizedEncoder

encoders = [NormalizedEncoder(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)),
                              torch.zeros(8), torch.ones(8)) for _ in range(8)]
started = threading.Barrier(len(encoders))

def compile_one(encoder):
    started.wait()
    return script(encoder)

with ThreadPoolExecutor(len(encoders)) as pool:
    scripted = list(pool.map(compile_one, encoders))
x = torch.rand(3, 8)
for encoder, compiled in zip(encoders, scripted, strict=True):
    assert torch.equal(compiled(x), encoder(x))
print("all", len(scripted))
"""


def test_torchscript_compiled_from_several_threads_at_once_in_a_new_process() -> None:
    """TorchScript compiles a class once per process; eight threads doing it at once for the
    first time failed with "Can't redefine method: forward" (5 of 5 runs) before the lock."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", SCRIPT_IN_THREADS], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).parents[2])  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["all", "8"]

"""Final evaluation and the artifacts of a finished autoencoder job (see DESIGN.md)."""

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from shared.specs import AutoencoderSpec
from workers.checkpoints import load_state
from workers.data import Split
from workers.figures import save_latent, save_reconstructions
from workers.models import Autoencoder, ExportedAutoencoder, NormalizedEncoder, build_model
from workers.objectives import corrupt, jacobian_frobenius
from workers.train_loop import evaluate

ARTIFACTS = [
    "encoder.pt",
    "encoder.safetensors",
    "model.json",
    "metrics.jsonl",
    "result.json",
    "reconstructions.png",
    "latent.png",
    "autoencoder.pt",
    "val_codes.npy",
]
SHOWN_SAMPLES = 10
NEAR_ZERO = 0.05


def pca_val_mse(x_train: np.ndarray, x_val: np.ndarray, components: int) -> float:
    """Validation MSE of PCA with `components` components fitted on the training split."""
    mean = x_train.mean(axis=0)
    _, _, vt = np.linalg.svd(x_train - mean, full_matrices=False)
    basis = vt[:components]  # (k, D)
    codes = (x_val - mean) @ basis.T
    return float(np.mean((codes @ basis + mean - x_val) ** 2))


def load_model(spec: AutoencoderSpec, checkpoint_folder: str) -> Autoencoder:
    model = build_model(spec.model, spec.data.input_shape, spec.objective.loss)
    model.load_state_dict(load_state(checkpoint_folder)["model"])
    return model.eval()


def final_metrics(model: Autoencoder, spec: AutoencoderSpec, split: Split) -> dict[str, float]:
    """Validation metrics of the trained model next to PCA at the same code size."""
    x_val = torch.from_numpy(split.x_val)
    metrics = evaluate(model, x_val, spec.objective)
    with torch.no_grad():
        codes = model.encoder(x_val)
    if spec.model.latent_dim < split.input_dim:
        pca = pca_val_mse(split.x_train, split.x_val, spec.model.latent_dim)
        metrics["pca_val_mse"] = pca
        metrics["mse_ratio_vs_pca"] = metrics["val_mse"] / pca if pca > 0 else float("inf")
    metrics["mean_activation"] = float(codes.mean())
    metrics["near_zero_fraction"] = float((codes.abs() < NEAR_ZERO).float().mean())
    metrics["jacobian_fro"] = float(jacobian_frobenius(model.encoder, x_val).mean())
    return metrics


def write_artifacts(
    folder: Path,
    spec: AutoencoderSpec,
    split: Split,
    model: Autoencoder,
    metrics: dict[str, Any],
    history: list[dict[str, Any]],
    job_id: str,
) -> list[str]:
    """Write every artifact into `folder`; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    norm = split.normalization
    encoder = NormalizedEncoder(
        model.encoder, torch.from_numpy(norm.shift), torch.from_numpy(norm.scale)
    ).eval()
    torch.jit.script(encoder).save(str(folder / "encoder.pt"))
    shift, scale = torch.from_numpy(norm.shift), torch.from_numpy(norm.scale)
    torch.jit.script(ExportedAutoencoder(model, shift, scale).eval()).save(
        str(folder / "autoencoder.pt")
    )
    with torch.no_grad():
        codes = model.encoder(torch.from_numpy(split.x_val)).numpy()
    np.save(folder / "val_codes.npy", codes.astype(np.float32), allow_pickle=False)
    tensors = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
    save_file(tensors, str(folder / "encoder.safetensors"))
    description = {
        "arch": spec.model.arch,
        "input_shape": list(spec.data.input_shape),
        "latent_dim": spec.model.latent_dim,
        "model": spec.model.model_dump(mode="json"),
        "loss": spec.objective.loss,
        "normalization": norm.to_json(),
        "input": "raw features: encoder.pt and encoder.safetensors include the normalization",
    }
    _write_text(folder / "model.json", json.dumps(description, indent=2))
    _write_text(folder / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history))
    save_figures(folder, spec, split, model)
    result = {"job_id": job_id, "metrics": metrics, "artifacts": ARTIFACTS}
    _write_text(folder / "result.json", json.dumps(result, indent=2))
    return list(ARTIFACTS)


@torch.no_grad()
def save_figures(folder: Path, spec: AutoencoderSpec, split: Split, model: Autoencoder) -> None:
    x = torch.from_numpy(split.x_val[:SHOWN_SAMPLES])
    rows = [("original", x.numpy())]
    if spec.objective.denoising:
        generator = torch.Generator().manual_seed(0)
        noisy = corrupt(x, spec.objective.denoising, generator)
        rows += [("corrupted", noisy.numpy()), ("from corrupted", model(noisy)[0].numpy())]
    rows.append(("reconstructed", model(x)[0].numpy()))
    save_reconstructions(folder / "reconstructions.png", rows, spec.data.input_shape)
    codes = model.encoder(torch.from_numpy(split.x_val)).numpy()
    save_latent(folder / "latent.png", codes, split.y_val)


def _write_text(path: Path, text: str) -> None:
    # Write then rename, so a reader never sees half a file.
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

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
from workers.losses import reconstruction_loss
from workers.models import Autoencoder, NormalizedEncoder, output_activation

ARTIFACTS = [
    "encoder.pt",
    "encoder.safetensors",
    "model.json",
    "metrics.jsonl",
    "result.json",
]


def pca_val_mse(x_train: np.ndarray, x_val: np.ndarray, components: int) -> float:
    """Validation MSE of PCA with `components` components fitted on the training split."""
    mean = x_train.mean(axis=0)
    _, _, vt = np.linalg.svd(x_train - mean, full_matrices=False)
    basis = vt[:components]  # (k, D)
    codes = (x_val - mean) @ basis.T
    return float(np.mean((codes @ basis + mean - x_val) ** 2))


def load_model(spec: AutoencoderSpec, input_dim: int, checkpoint_folder: str) -> Autoencoder:
    model = Autoencoder(spec.model, input_dim, output_activation(spec.objective.loss))
    model.load_state_dict(load_state(checkpoint_folder)["model"])
    return model.eval()


@torch.no_grad()
def final_metrics(model: Autoencoder, spec: AutoencoderSpec, split: Split) -> dict[str, float]:
    x_val = torch.from_numpy(split.x_val)
    codes = model.encoder(x_val)
    x_hat = model.decoder(codes)
    metrics = {"val_mse": float(torch.mean((x_hat - x_val) ** 2))}
    if spec.objective.loss == "bce":
        metrics["val_bce"] = float(reconstruction_loss(x_hat, x_val, "bce"))
    if spec.model.latent_dim < split.input_dim:
        pca = pca_val_mse(split.x_train, split.x_val, spec.model.latent_dim)
        metrics["pca_val_mse"] = pca
        metrics["mse_ratio_vs_pca"] = metrics["val_mse"] / pca if pca > 0 else float("inf")
    metrics["mean_activation"] = float(codes.mean())
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
    tensors = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
    save_file(tensors, str(folder / "encoder.safetensors"))
    description = {
        "arch": spec.model.arch,
        "input_shape": [split.input_dim],
        "latent_dim": spec.model.latent_dim,
        "model": spec.model.model_dump(mode="json"),
        "loss": spec.objective.loss,
        "normalization": norm.to_json(),
        "input": "raw features: encoder.pt and encoder.safetensors include the normalization",
    }
    _write_text(folder / "model.json", json.dumps(description, indent=2))
    _write_text(folder / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history))
    result = {"job_id": job_id, "metrics": metrics, "artifacts": ARTIFACTS}
    _write_text(folder / "result.json", json.dumps(result, indent=2))
    return list(ARTIFACTS)


def _write_text(path: Path, text: str) -> None:
    # Write then rename, so a reader never sees half a file.
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

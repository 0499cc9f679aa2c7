"""Final evaluation and the artifact files of a finished job (see DESIGN.md)."""

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file, save_model
from torch import nn

from shared.specs import DenoisingSpec, ObjectiveSpec
from workers.data import Split
from workers.export_lock import script
from workers.figures import save_curves, save_latent, save_reconstructions
from workers.models import Autoencoder, ExportedAutoencoder, NormalizedEncoder
from workers.objectives import corrupt, evaluate_reconstruction, jacobian_frobenius
from workers.onnx_export import onnx_bytes
from workers.tensorboard_events import event_files

SHOWN_SAMPLES = 10
NEAR_ZERO = 0.05


def pca_val_mse(x_train: np.ndarray, x_val: np.ndarray, components: int) -> float:
    """Validation MSE of PCA with `components` components fitted on the training split."""
    mean = x_train.mean(axis=0)
    _, _, vt = np.linalg.svd(x_train - mean, full_matrices=False)
    basis = vt[:components]  # (k, D)
    codes = (x_val - mean) @ basis.T
    return float(np.mean((codes @ basis + mean - x_val) ** 2))


def final_metrics(
    model: Autoencoder, objective: ObjectiveSpec, latent_dim: int, split: Split
) -> dict[str, float]:
    """Validation metrics of a trained autoencoder next to PCA at the same code size."""
    x_val = torch.from_numpy(split.x_val)
    metrics = evaluate_reconstruction(model, x_val, objective)
    with torch.no_grad():
        codes = model.encoder(x_val)
    if latent_dim < split.input_dim:
        pca = pca_val_mse(split.x_train, split.x_val, latent_dim)
        metrics["pca_val_mse"] = pca
        metrics["mse_ratio_vs_pca"] = metrics["val_mse"] / pca if pca > 0 else float("inf")
    metrics["mean_activation"] = float(codes.mean())
    metrics["near_zero_fraction"] = float((codes.abs() < NEAR_ZERO).float().mean())
    metrics["jacobian_fro"] = float(jacobian_frobenius(model.encoder, x_val).mean())
    return metrics


class ArtifactWriter:
    """Writes a job's files into its attempt folder and remembers their names."""

    def __init__(self, folder: Path, split: Split) -> None:
        self.folder, self.split = folder, split
        self.names: list[str] = []
        folder.mkdir(parents=True, exist_ok=True)
        norm = split.normalization
        self.shift, self.scale = torch.from_numpy(norm.shift), torch.from_numpy(norm.scale)

    def encoder(self, encoder: nn.Module) -> None:
        """encoder.pt (TorchScript), encoder.safetensors and encoder.onnx, normalization
        built in."""
        exported = NormalizedEncoder(encoder, self.shift, self.scale).eval()
        script(exported).save(str(self._path("encoder.pt")))
        tensors = {k: v.detach().contiguous() for k, v in exported.state_dict().items()}
        save_file(tensors, str(self._path("encoder.safetensors")))
        self._bytes("encoder.onnx", onnx_bytes(exported, self.split.input_dim))

    def autoencoder(self, model: Autoencoder, denoising: DenoisingSpec | None,
                    input_shape: tuple[int, ...]) -> None:  # fmt: skip
        """The encoder files, autoencoder.pt, codes for interpolation and the pictures."""
        self.encoder(model.encoder)
        exported = ExportedAutoencoder(model, self.shift, self.scale).eval()
        script(exported).save(str(self._path("autoencoder.pt")))
        # The API decodes for interpolation from these weights, never from a TorchScript file.
        # save_model stores a tied decoder's shared tensors once.
        save_model(exported, str(self._path("autoencoder.safetensors")))
        x_val = torch.from_numpy(self.split.x_val)
        with torch.no_grad():
            codes = model.encoder(x_val).numpy()
            np.save(self._path("val_codes.npy"), codes.astype(np.float32), allow_pickle=False)
            x = x_val[:SHOWN_SAMPLES]
            rows = [("original", x.numpy())]
            if denoising is not None:
                noisy = corrupt(x, denoising, torch.Generator().manual_seed(0))
                rows += [("corrupted", noisy.numpy()), ("from corrupted", model(noisy)[0].numpy())]
            rows.append(("reconstructed", model(x)[0].numpy()))
        save_reconstructions(self._path("reconstructions.png"), rows, input_shape)
        save_latent(self._path("latent.png"), codes, self.split.y_val)

    def module(self, name: str, module: nn.Module) -> None:
        script(module).save(str(self._path(name)))

    def json(self, name: str, value: Any) -> None:
        self._text(name, json.dumps(value, indent=2))

    def jsonl(self, name: str, rows: list[dict[str, Any]]) -> None:
        self._text(name, "".join(json.dumps(row) + "\n" for row in rows))

    def curves(self, history: list[dict[str, Any]], stages: Sequence[str]) -> None:
        """curves.png: train and validation metrics per epoch, a panel per stage."""
        save_curves(self._path("curves.png"), history, stages)

    def tensorboard(
        self, history: list[dict[str, Any]], started: Mapping[str, float] | None = None
    ) -> None:
        """tensorboard/<stage>/events.out.tfevents.<stage>: the same metrics for TensorBoard."""
        for name, data in event_files(history, started).items():
            self._bytes(name, data)

    def result(self, job_id: str, metrics: dict[str, Any]) -> list[str]:
        """result.json, written last; returns every artifact name."""
        self.names.append("result.json")
        result = {"job_id": job_id, "metrics": metrics, "artifacts": self.names}
        self._text("result.json", json.dumps(result, indent=2), register=False)
        return list(self.names)

    def _path(self, name: str) -> Path:
        self.names.append(name)
        path = self.folder / name
        path.parent.mkdir(parents=True, exist_ok=True)  # the event files have a folder each
        return path

    def _text(self, name: str, text: str, register: bool = True) -> None:
        self._bytes(name, text.encode(), register)

    def _bytes(self, name: str, data: bytes, register: bool = True) -> None:
        path = self._path(name) if register else self.folder / name
        tmp = path.with_suffix(path.suffix + ".tmp")  # a reader never sees half a file
        tmp.write_bytes(data)
        os.replace(tmp, path)

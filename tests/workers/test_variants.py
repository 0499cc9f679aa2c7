"""Every objective in one job through the real path, then its pictures and interpolation."""

import io
import json

import matplotlib.image
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sklearn.datasets import load_digits

from shared.settings import Settings
from shared.storage import LocalStorage
from shared.store import JobStore
from workers.dispatcher import Dispatcher
from workers.group_pool import GroupPool

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Conv encoder + denoising + the contractive estimator + L1 sparsity: every code path of the
# train step at once, in one short job.
EVERYTHING = {
    "kind": "autoencoder",
    "name": "all-objectives",
    "data": {"dataset": "digits"},
    "model": {"arch": "conv", "channels": [8, 16], "latent_dim": 12, "code_activation": "relu"},
    "objective": {
        "loss": "mse",
        "denoising": {"type": "gaussian", "std": 0.1},
        "contractive": {"weight": 0.01, "projections": 2},
        "sparsity": {"type": "l1", "weight": 0.001},
    },
    "training": {"epochs": 4, "batch_size": 64, "lr": 0.003, "checkpoint_every": 2},
}


def test_a_job_with_every_objective_reports_pictures_and_interpolates(
    client: TestClient, store: JobStore, storage: LocalStorage, settings: Settings,
    ray_address: str,
    group_pool: GroupPool,
) -> None:  # fmt: skip
    job_id = client.post("/v1/jobs", json=EVERYTHING).json()["id"]
    Dispatcher(store, storage, settings.require_redis_url(), ray_address,
               pool=group_pool).run_once(block_ms=2000)  # fmt: skip
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded", job["error"]

    metrics = client.get(f"/v1/jobs/{job_id}/result").json()["metrics"]
    for name in ("val_mse", "val_mse_corrupted", "pca_val_mse", "mse_ratio_vs_pca",
                 "mean_activation", "near_zero_fraction", "jacobian_fro"):  # fmt: skip
        assert np.isfinite(metrics[name]), name
    # Denoising: inputs with noise reconstruct worse than clean ones.
    assert metrics["val_mse_corrupted"] > metrics["val_mse"]
    assert metrics["jacobian_fro"] > 0 and 0 <= metrics["near_zero_fraction"] <= 1

    for name in ("reconstructions.png", "latent.png"):
        png = client.get(f"/v1/jobs/{job_id}/artifacts/{name}").content
        assert png.startswith(PNG_MAGIC)
        height, width, _ = matplotlib.image.imread(io.BytesIO(png)).shape
        assert height > 100 and width > 100

    path = f"/v1/jobs/{job_id}/interpolate"
    line = client.post(path, json={"a": 0, "b": 5, "steps": 6}).json()
    codes, outputs = np.array(line["codes"]), np.array(line["outputs"])
    assert codes.shape == (6, 12) and outputs.shape == (6, 64)
    assert line["input_shape"] == [1, 8, 8]
    # Points on a line: equal steps between consecutive codes.
    steps = np.diff(codes, axis=0)
    np.testing.assert_allclose(steps, np.broadcast_to(steps[0], steps.shape), atol=1e-5)
    # Decoded in raw units (digits pixels are 0..16), not in the normalized space.
    assert outputs.max() > 2.0
    strip = client.post(path, params={"format": "png"}, json={"a": 0, "b": 5})
    assert strip.headers["content-type"] == "image/png" and strip.content.startswith(PNG_MAGIC)
    too_far = client.post(path, json={"a": 0, "b": 10_000})
    assert too_far.status_code == 422 and too_far.json()["detail"][0]["field"] == "b"
    assert client.post(path, json={"a": 0, "b": 1, "steps": 1}).status_code == 422


def test_a_conv_job_trains_on_an_uploaded_image_dataset(
    client: TestClient, store: JobStore, storage: LocalStorage, settings: Settings,
    ray_address: str,
    group_pool: GroupPool,
) -> None:  # fmt: skip
    bunch = load_digits()
    body = io.BytesIO()
    np.savez(body, x=bunch.images[:400], y=bunch.target[:400])  # (n, h, w) float64 images
    dataset = client.post("/v1/datasets", content=body.getvalue()).json()["id"]
    spec = {**EVERYTHING, "data": {"dataset": dataset}, "objective": {"loss": "mse"}}
    job_id = client.post("/v1/jobs", json=spec).json()["id"]
    Dispatcher(store, storage, settings.require_redis_url(), ray_address,
               pool=group_pool).run_once(block_ms=2000)  # fmt: skip
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded", job["error"]
    metrics = client.get(f"/v1/jobs/{job_id}/result").json()["metrics"]
    assert 0 < metrics["val_mse"] < 1.5 * metrics["pca_val_mse"] + 1.0
    model = json.loads(client.get(f"/v1/jobs/{job_id}/artifacts/model.json").content)
    assert model["input_shape"] == [1, 8, 8] and model["arch"] == "conv"
    line = client.post(f"/v1/jobs/{job_id}/interpolate", json={"a": 0, "b": 1, "steps": 3})
    assert np.array(line.json()["outputs"]).shape == (3, 64)

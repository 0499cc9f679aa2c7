"""Interpolation of a job on very wide samples, over HTTP and a real Redis, no Ray: the PNG has
a fixed most pixels and bytes, a JSON reply a fixed most numbers, and the finalize pictures of
such a job are bounded too."""

import io
from typing import Any

import matplotlib.image
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from shared.jobs import JobRecord, JobState
from shared.specs import AutoencoderSpec
from shared.storage import LocalStorage
from shared.store import JobStore
from tests.service.test_datasets import npz_bytes, upload
from workers.artifacts import ArtifactWriter
from workers.data import build_datasets
from workers.interpolation import MAX_REPLY_VALUES, ReplyTooLarge
from workers.models import build_model

pytestmark = pytest.mark.timeout(120)

ROWS, FEATURES, LATENT = 50, 65536, 4
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def pixels(png: bytes) -> tuple[int, int]:
    height, width, _ = matplotlib.image.imread(io.BytesIO(png)).shape
    return width, height


def wide_spec(dataset: str) -> dict[str, Any]:
    return {
        "kind": "autoencoder",
        "data": {"dataset": dataset, "validation_fraction": 0.2, "seed": 0},
        "model": {"arch": "dense", "hidden": [8], "latent_dim": LATENT},
        "training": {"epochs": 1},
    }


@pytest.fixture
def wide_job(client: TestClient, store: JobStore, storage: LocalStorage) -> JobRecord:
    """A job on a (50, 65536) upload, finished with the files the dispatcher writes, from an
    untrained model: what is drawn does not matter here, only how much."""
    x = np.random.default_rng(0).random((ROWS, FEATURES), dtype=np.float32)
    response = upload(client, npz_bytes(x=x))
    assert response.status_code == 201, response.text
    submitted = client.post("/v1/jobs", json=wide_spec(response.json()["id"]))
    assert submitted.status_code == 201, submitted.text
    claim = store.claim("test-runner", lease_ttl_s=30.0, block_ms=50)
    assert claim is not None and claim.job.id == submitted.json()["id"]
    spec = claim.job.spec
    assert isinstance(spec, AutoencoderSpec)
    folder = storage.attempt_folder(claim.job.id, claim.token)
    split = build_datasets(spec.data, datasets=storage.datasets_root)  # reads the stored .npz
    torch.manual_seed(0)
    writer = ArtifactWriter(storage.root / folder, split)
    writer.autoencoder(build_model(spec.model, spec.data.input_shape, "mse").eval(), None,
                       spec.data.input_shape)  # fmt: skip
    result = {"artifacts": writer.names, "folder": folder, "metrics": {}}
    return store.finish(claim, JobState.SUCCEEDED, result=result)


def test_a_wide_jobs_pictures_and_interpolation_are_bounded(
    client: TestClient, wide_job: JobRecord, storage: LocalStorage
) -> None:
    assert wide_job.result is not None
    folder = storage.root / wide_job.result["folder"]
    for name, most in (("reconstructions.png", (1564, 208)), ("latent.png", (400, 360))):
        png = (folder / name).read_bytes()
        width, height = pixels(png)
        assert width <= most[0] and height <= most[1], (name, width, height)
        assert len(png) < 300_000, (name, len(png))

    path = f"/v1/jobs/{wide_job.id}/interpolate"
    strip = client.post(path, params={"format": "png"}, json={"a": 0, "b": 5, "steps": 64})
    assert strip.status_code == 200 and strip.content.startswith(PNG_MAGIC)
    assert pixels(strip.content) == (1564, 416)  # 16 panels a row, 4 rows
    assert len(strip.content) < 500_000, len(strip.content)

    # JSON: every number or a 422 that says what fits; never a reply cut short.
    fits = MAX_REPLY_VALUES // (LATENT + FEATURES)
    too_many = client.post(path, json={"a": 0, "b": 5, "steps": fits + 1})
    assert too_many.status_code == 422, too_many.text
    (error,) = too_many.json()["detail"]
    assert error["field"] == "steps"
    assert f"at most {fits} steps" in error["msg"] and "format=png" in error["msg"]

    line = client.post(path, json={"a": 0, "b": 5, "steps": fits})
    assert line.status_code == 200, line.text
    assert np.array(line.json()["outputs"]).shape == (fits, FEATURES)
    assert len(line.content) < 30 * MAX_REPLY_VALUES  # at most ~25 characters a number


def test_when_not_even_two_steps_fit_in_json_the_refusal_says_use_png() -> None:
    message = str(ReplyTooLarge(2, 2**20 + LATENT, MAX_REPLY_VALUES))
    assert "ask for format=png" in message and "at most 0 steps" not in message

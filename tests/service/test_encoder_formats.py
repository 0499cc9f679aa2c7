"""GET /v1/jobs/{id}/encoder?format=onnx over HTTP and a real Redis, no Ray: the ONNX file the
workers write is served as is, a bad format is a 422 on `format`, and a job that finished
before ONNX export gives a 404 that says so."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from fastapi.testclient import TestClient

from aetrain import Client
from aetrain.errors import NotFound
from shared.jobs import JobRecord, JobState
from shared.specs import AutoencoderSpec, parse_job_spec
from shared.storage import LocalStorage
from shared.store import JobStore
from tests.service.helpers import succeeded_job
from tests.specs import digits_spec
from workers.artifacts import ArtifactWriter
from workers.models import build_model
from workers.tasks import job_split

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def encoder_job(store: JobStore, storage: LocalStorage) -> JobRecord:
    """A digits job finished with the encoder files the workers write (untrained weights)."""
    job, _ = store.submit(JobRecord.for_spec(parse_job_spec(digits_spec()), "default"))
    claim = store.claim("test-runner", lease_ttl_s=30.0, block_ms=50)
    assert claim is not None and claim.job.id == job.id
    spec = claim.job.spec
    assert isinstance(spec, AutoencoderSpec)
    folder = storage.attempt_folder(job.id, claim.token)
    writer = ArtifactWriter(storage.root / folder, job_split(spec, None))
    torch.manual_seed(0)
    writer.encoder(build_model(spec.model, spec.data.input_shape, "mse").encoder.eval())
    result = {"artifacts": writer.names, "folder": folder, "metrics": {}}
    return store.finish(claim, JobState.SUCCEEDED, result=result)


def test_onnx_encoder_is_served_and_runs_in_onnxruntime(
    client: TestClient, encoder_job: JobRecord, storage: LocalStorage
) -> None:
    response = client.get(f"/v1/jobs/{encoder_job.id}/encoder", params={"format": "onnx"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    assert f'filename="{encoder_job.id}-encoder.onnx"' in response.headers["content-disposition"]
    assert encoder_job.result is not None
    stored = storage.root / encoder_job.result["folder"] / "encoder.onnx"
    assert response.content == stored.read_bytes()

    session = ort.InferenceSession(response.content, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(0, 16, (5, 64)).astype(np.float32)  # raw digits
    (codes,) = session.run(["codes"], {"x": x})
    assert codes.shape == (5, 16) and np.isfinite(codes).all()


def test_torchscript_stays_the_default_format(
    client: TestClient, encoder_job: JobRecord, storage: LocalStorage
) -> None:
    assert encoder_job.result is not None
    folder = storage.root / encoder_job.result["folder"]
    response = client.get(f"/v1/jobs/{encoder_job.id}/encoder")
    assert response.status_code == 200 and response.content == (folder / "encoder.pt").read_bytes()


def test_an_unknown_format_is_a_422_naming_format(
    client: TestClient, encoder_job: JobRecord
) -> None:
    response = client.get(f"/v1/jobs/{encoder_job.id}/encoder", params={"format": "bogus"})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["field"] == "format" and error["loc"] == ["query", "format"]
    assert "onnx" in error["msg"]  # the message lists the formats there are


def test_a_job_from_before_onnx_export_is_a_404_saying_so(
    client: TestClient, store: JobStore, storage: LocalStorage
) -> None:
    old = succeeded_job(store, storage)  # encoder.pt and encoder.safetensors, no encoder.onnx
    response = client.get(f"/v1/jobs/{old.id}/encoder", params={"format": "onnx"})
    assert response.status_code == 404
    detail = response.json()["detail"]
    assert old.id in detail and "no ONNX encoder" in detail and "finished before" in detail
    assert client.get(f"/v1/jobs/{old.id}/encoder").status_code == 200  # its other formats stay


def test_client_downloads_the_onnx_encoder(
    client: TestClient,
    encoder_job: JobRecord,
    store: JobStore,
    storage: LocalStorage,
    tmp_path: Path,
) -> None:
    api = Client(http=client)
    written = api.download_encoder(encoder_job.id, tmp_path, format="onnx")
    assert written == tmp_path / f"{encoder_job.id}-encoder.onnx"
    ort.InferenceSession(str(written), providers=["CPUExecutionProvider"])  # loads
    old = succeeded_job(store, storage)
    with pytest.raises(NotFound, match="no ONNX encoder"):
        api.download_encoder(old.id, tmp_path / "old.onnx", format="onnx")
    assert not (tmp_path / "old.onnx").exists()

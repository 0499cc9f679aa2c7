"""The client around a job that really trains: submit, wait, result, and the encoder it made."""

import threading
from typing import TYPE_CHECKING

import pytest
import torch
from fastapi.testclient import TestClient

from aetrain import Client, Job
from shared.settings import Settings
from shared.storage import LocalStorage
from shared.store import JobStore
from tests.specs import digits_spec

if TYPE_CHECKING:
    from workers.group_pool import GroupPool

pytestmark = [pytest.mark.ray, pytest.mark.timeout(120)]


def test_a_job_submitted_and_waited_for_gives_a_loaded_encoder_that_encodes(
    client: TestClient, store: JobStore, storage: LocalStorage, settings: Settings,
    ray_address: str, group_pool: "GroupPool",
) -> None:  # fmt: skip
    from workers.dispatcher import Dispatcher

    api = Client(http=client)
    job_id = api.submit(digits_spec(epochs=2))["id"]
    seen: list[Job] = []
    finals: list[Job] = []
    waiter = threading.Thread(
        target=lambda: finals.append(api.wait(job_id, seen.append, timeout=100, poll_s=0.2))
    )
    waiter.start()
    # What `aetrain worker` does, once: claim the job and train it on the session's Ray.
    Dispatcher(store, storage, settings.require_redis_url(), ray_address,
               pool=group_pool).run_once(2000)  # fmt: skip
    waiter.join(timeout=100)
    (final,) = finals
    assert final["state"] == "succeeded", final["error"]
    assert seen[0]["state"] in {"queued", "running"} and seen[-1] == final

    result = api.result(job_id)
    assert result["metrics"]["val_mse"] > 0 and "encoder.pt" in result["artifacts"]
    encoder = api.load_encoder(job_id)
    assert isinstance(encoder, torch.nn.Module) and not encoder.training
    with torch.no_grad():
        codes = encoder(torch.rand(5, 64) * 16)  # digits: 8x8 pixels in 0..16, flattened
    assert codes.shape == (5, 16) and bool(torch.isfinite(codes).all())  # latent_dim 16

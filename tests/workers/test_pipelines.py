"""Stacked and semisupervised jobs: stages as separate Ray Train runs, results, resume."""

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from fastapi.testclient import TestClient

from shared.settings import Settings
from shared.storage import LocalStorage
from shared.store import JobStore
from tests.specs import set_field
from workers.dispatcher import Dispatcher
from workers.group_pool import GroupPool

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def example(name: str, **changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    for path, value in changes.items():
        set_field(spec, path.replace("__", "."), value)
    return spec


def run_one(
    store: JobStore, storage: LocalStorage, settings: Settings, ray_address: str, pool: GroupPool
) -> None:
    Dispatcher(store, storage, settings.require_redis_url(), ray_address,
               pool=pool).run_once(2000)  # fmt: skip


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def test_stacked_example_trains_layer_by_layer_then_finetunes_beside_its_baseline(
    client: TestClient, store: JobStore, storage: LocalStorage, settings: Settings,
    ray_address: str, tmp_path: Path, group_pool: GroupPool,
) -> None:  # fmt: skip
    spec = example("stacked-digits.yaml", training__epochs=2, finetune__epochs=1)
    job_id = client.post("/v1/jobs", json=spec).json()["id"]
    assert [s["name"] for s in client.get(f"/v1/jobs/{job_id}").json()["stages"]] == [
        "layer1", "layer2", "layer3", "finetune", "baseline"]  # fmt: skip
    run_one(store, storage, settings, ray_address, group_pool)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded", job["error"]
    stages = {s["name"]: s for s in job["stages"]}
    # Each stage started after the one it needs had finished.
    for before, after in [("layer1", "layer2"), ("layer2", "layer3"), ("layer3", "finetune")]:
        assert stages[before]["finished_at"] <= stages[after]["started_at"]
    metrics = client.get(f"/v1/jobs/{job_id}/result").json()["metrics"]
    for i in (1, 2, 3):
        assert metrics[f"layer{i}_val_mse"] > 0  # each layer's error on its own input
    assert 0 < metrics["val_mse"] < 0.2 and metrics["pca_val_mse"] > 0
    # The same shape from scratch, for all 3 x 2 + 1 epochs of the pipeline, beside the chain.
    assert stages["baseline"]["needs"] == [] and stages["baseline"]["epoch"] == 6
    assert 0 < metrics["baseline_val_mse"] < 0.2
    assert metrics["pretraining_gain"] == pytest.approx(
        metrics["baseline_val_mse"] - metrics["val_mse"])  # fmt: skip
    encoder_file = tmp_path / "stack.pt"
    encoder_file.write_bytes(client.get(f"/v1/jobs/{job_id}/encoder").content)
    codes = torch.jit.load(str(encoder_file))(torch.rand(5, 64) * 16)
    assert codes.shape == (5, 12) and bool((codes < 0).any())  # the linear code of the stack


def test_semisupervised_example_reports_head_and_baseline_accuracy(
    client: TestClient, store: JobStore, storage: LocalStorage, settings: Settings,
    ray_address: str, tmp_path: Path, group_pool: GroupPool,
) -> None:  # fmt: skip
    spec = example("semisupervised-digits.yaml", pretrain__training__epochs=3, head__epochs=20,
                   labeled_fraction=0.2)  # fmt: skip
    job_id = client.post("/v1/jobs", json=spec).json()["id"]
    run_one(store, storage, settings, ray_address, group_pool)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded", job["error"]
    assert [s["name"] for s in job["stages"]] == ["pretrain", "head", "baseline"]
    assert job["stages"][2]["needs"] == [] and job["stages"][1]["needs"] == ["pretrain"]
    pretrain, head, baseline = job["stages"]
    # The baseline needs nothing: it ran beside the pretraining (1 CPU each of 2), and the
    # head started only once the pretraining had finished.
    assert baseline["started_at"] < pretrain["finished_at"]
    assert head["started_at"] >= pretrain["finished_at"]
    result = client.get(f"/v1/jobs/{job_id}/result").json()
    metrics = result["metrics"]
    # 10 classes: chance is 0.1; both learn something from 20% of the labels.
    assert 0.3 < metrics["head_accuracy"] <= 1 and 0.3 < metrics["baseline_accuracy"] <= 1
    assert metrics["accuracy_gain"] == pytest.approx(
        metrics["head_accuracy"] - metrics["baseline_accuracy"])  # fmt: skip
    assert metrics["labeled"] == round(0.2 * 1149)  # of the training split (digits, 64% of 1797)
    # label spreading (the example's method) labeled every other unlabeled input: the
    # training split and the validation samples it does not score (of 288)
    unscored = 288 - head["result"]["val_labeled"]
    assert unscored > 0 and metrics["pseudo_labeled"] == 1149 + unscored - metrics["labeled"]
    assert "classifier.pt" in result["artifacts"]
    classifier_file = tmp_path / "classifier.pt"
    classifier_file.write_bytes(client.get(f"/v1/jobs/{job_id}/artifacts/classifier.pt").content)
    logits = torch.jit.load(str(classifier_file))(torch.rand(4, 64) * 16)
    assert logits.shape == (4, 10)


def test_a_stage_larger_than_the_cluster_fails_with_a_reason(
    client: TestClient, store: JobStore, storage: LocalStorage, settings: Settings,
    ray_address: str,
    group_pool: GroupPool,
) -> None:  # fmt: skip
    spec = example("stacked-digits.yaml", resources={"workers": 64})
    job_id = client.post("/v1/jobs", json=spec).json()["id"]
    run_one(store, storage, settings, ray_address, group_pool)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "failed"
    assert "layer1" in job["error"] and "more than the whole cluster" in job["error"]


def test_a_killed_stacked_job_resumes_at_the_stage_after_the_last_finished(
    client: TestClient, store: JobStore, storage: LocalStorage, settings: Settings,
    ray_address: str,
    one_group_pool: GroupPool,  # the other CPU for the dispatcher killed
) -> None:  # fmt: skip
    spec = example("stacked-digits.yaml", finetune=None, baseline=False)
    # Enough epochs that layer 3 is still training when the test sees it start (polled every
    # 0.3 s), few enough that the layers are not most of the test's CPU.
    spec["training"] = {"epochs": 120, "batch_size": 128, "lr": 0.003, "checkpoint_every": 40}
    spec["layers"] = [{"units": units, "activation": "sigmoid"} for units in (48, 24, 12)]
    job_id = client.post("/v1/jobs", json=spec).json()["id"]
    env = {**os.environ, "AETRAIN_REDIS_URL": settings.require_redis_url(),
           "AETRAIN_STORAGE": str(settings.storage_root), "RAY_ADDRESS": ray_address,
           "RAY_AUTH_MODE": "token", "AETRAIN_LEASE_TTL_S": "3"}  # fmt: skip

    first = subprocess.Popen([sys.executable, "-m", "workers"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    # The one taking over runs here, on the session's warm group: a process and a group
    # fewer to start (~20 CPU-s).
    second = Dispatcher(store, storage, settings.require_redis_url(), ray_address,
                        pool=one_group_pool)  # fmt: skip
    taking_over = threading.Thread(target=second.run_forever, daemon=True)
    try:

        def layer3_running() -> bool:
            stages = {s["name"]: s for s in client.get(f"/v1/jobs/{job_id}").json()["stages"]}
            return (
                stages["layer2"]["state"] == "succeeded" and stages["layer3"]["epoch"] is not None
            )

        wait_for(layer3_running, 200, "layer 3 to start training")
        first.send_signal(signal.SIGKILL)  # the dispatcher dies; its stage process dies with it
        first.wait()
        taking_over.start()
        job = wait_for(
            lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["state"] != "running" and j,
            200, "the job to finish after the takeover",
        )  # fmt: skip
    finally:
        first.kill()
        second.stop()
        if taking_over.is_alive():
            taking_over.join(timeout=60)
    assert job["state"] == "succeeded", job["error"]
    assert job["attempts"] == 2
    history = store.metrics_history(job_id)
    tokens = {stage: {m["token"] for m in history if m["stage"] == stage}
              for stage in ("layer1", "layer2", "layer3")}  # fmt: skip
    first_token = min(tokens["layer1"])
    # Stages finished before the kill were not redone; the second run went on from layer 3.
    assert tokens["layer1"] == {first_token} and tokens["layer2"] == {first_token}
    assert tokens["layer3"] == {first_token + 1}
    logs = sorted(p.name for p in (storage.root / "jobs" / job_id / "logs").glob("*.log"))
    assert logs == [
        f"layer1-attempt-{first_token}.log",
        f"layer2-attempt-{first_token}.log",
        f"layer3-attempt-{first_token}.log",
        f"layer3-attempt-{first_token + 1}.log",
    ]


def test_semisupervised_on_a_stacked_pretraining_with_a_finetuned_encoder(
    client: TestClient, store: JobStore, storage: LocalStorage, settings: Settings,
    ray_address: str,
    group_pool: GroupPool,
) -> None:  # fmt: skip
    spec = {
        "kind": "semisupervised",
        "data": {"dataset": "digits"},
        "labeled_count": 100,
        "pretrain": {"kind": "stacked", "layers": [{"units": 32}, {"units": 16}],
                     "finetune": {"epochs": 2}, "training": {"epochs": 3}},
        "head": {"hidden": [32], "epochs": 10},
        "finetune_encoder": True,
        "baseline": False,
    }  # fmt: skip
    job_id = client.post("/v1/jobs", json=spec).json()["id"]
    run_one(store, storage, settings, ray_address, group_pool)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded", job["error"]
    assert [(s["name"], s["state"]) for s in job["stages"]] == [
        ("pretrain-layer1", "succeeded"), ("pretrain-layer2", "succeeded"),
        ("pretrain-finetune", "succeeded"), ("head", "succeeded")]  # fmt: skip
    metrics = client.get(f"/v1/jobs/{job_id}/result").json()["metrics"]
    assert metrics["labeled"] == 100 and 0 <= metrics["head_accuracy"] <= 1
    assert "baseline_accuracy" not in metrics  # baseline: false plans no baseline stage
    encoder = client.get(f"/v1/jobs/{job_id}/encoder").content
    assert len(encoder) > 1000


def test_a_joint_head_trains_encoder_decoder_and_head_together_and_exports_the_classifier(
    client: TestClient, store: JobStore, storage: LocalStorage, settings: Settings,
    ray_address: str,
    tmp_path: Path, group_pool: GroupPool,
) -> None:  # fmt: skip
    spec = {
        "kind": "semisupervised",
        "data": {"dataset": "digits"},
        "labeled_count": 60,
        "pretrain": {"kind": "autoencoder", "model": {"hidden": [32], "latent_dim": 16},
                     "training": {"epochs": 2}},
        "head": {"method": "joint", "reconstruction_weight": 2.0, "hidden": [], "epochs": 2},
        "baseline": False,
    }  # fmt: skip
    job_id = client.post("/v1/jobs", json=spec).json()["id"]
    run_one(store, storage, settings, ray_address, group_pool)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded", job["error"]
    head = {s["name"]: s for s in job["stages"]}["head"]
    # every training input is reconstructed each epoch: 1149 rows, not the 60 labeled ones
    assert head["metrics"]["samples_per_s"] * head["metrics"]["epoch_seconds"] == pytest.approx(
        1149, rel=1e-6)  # fmt: skip
    metrics = client.get(f"/v1/jobs/{job_id}/result").json()["metrics"]
    assert metrics["labeled"] == 60 and 0.2 < metrics["head_accuracy"] <= 1
    classifier_file = tmp_path / "classifier.pt"
    classifier_file.write_bytes(client.get(f"/v1/jobs/{job_id}/artifacts/classifier.pt").content)
    logits = torch.jit.load(str(classifier_file))(torch.rand(3, 64) * 16)
    assert logits.shape == (3, 10)  # the classifier alone: the decoder is not exported

"""The HTTP contract on a real Redis: 201 / 200 / 404 / 409 / 422 / 503, nothing queued on 422."""

from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from service.app import create_app
from shared.settings import Settings
from shared.store import JobStore
from tests.conftest import free_port
from tests.specs import digits_spec, set_field


def queued_messages(store: JobStore) -> int:
    return len(store.queued_ids())


def test_submit_returns_the_queued_record(client: TestClient, store: JobStore) -> None:
    response = client.post("/v1/jobs", json=digits_spec())
    assert response.status_code == 201
    job = response.json()
    assert job["state"] == "queued"
    assert job["kind"] == "autoencoder" and job["name"] == "digits-dense"
    assert [s["name"] for s in job["stages"]] == ["train"]
    assert job["spec"]["model"]["latent_dim"] == 16
    assert job["created_at"].endswith("Z") or job["created_at"].endswith("+00:00")
    assert queued_messages(store) == 1
    assert client.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]


def _with(path: str, value: Any) -> dict[str, Any]:
    return set_field(digits_spec(), path, value)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (_with("kind", "gan"), "kind"),
        (_with("training.epochs", -3), "training.epochs"),
        (_with("model.latent_dim", 0), "model.latent_dim"),
        (_with("data.dataset", "imagenet"), "data.dataset"),
        (_with("training.batch_size", "lots"), "training.batch_size"),
        (_with("training.lr", "fast"), "training.lr"),
        (_with("resources.workers", 0), "resources.workers"),
        (_with("model.hidden", [128, 0]), "model.hidden.1"),
        (_with("training.epochz", 3), "training.epochz"),
        (_with("model.hidden", [8192, 8192]), "model"),
        (_with("model.arch", "rnn"), "model.arch"),
        (_with("objective.sparsity", {"type": "kl", "target": 0.05}), "objective.sparsity"),
        (_with("objective.sparsity", {"type": "kl", "target": 1.5}), "objective.sparsity.target"),
        (_with("objective.denoising", {"type": "blur"}), "objective.denoising.type"),
        (
            _with("objective.denoising", {"type": "masking", "fraction": 1.0}),
            "objective.denoising.fraction",
        ),
        (_with("objective.contractive", {"weight": -1}), "objective.contractive.weight"),
        (
            _with("model", {"arch": "conv", "latent_dim": 2}) | {"data": {"dataset": "swiss_roll"}},
            "model.arch",
        ),
        (
            _with("objective.loss", "bce")
            | {"data": {"dataset": "digits", "normalize": "standard"}},
            "objective.loss",
        ),
    ],
)
def test_bad_spec_is_422_naming_the_field_and_nothing_is_queued(
    client: TestClient, store: JobStore, spec: dict[str, Any], field: str
) -> None:
    response = client.post("/v1/jobs", json=spec)
    assert response.status_code == 422
    fields = [error["field"] for error in response.json()["detail"]]
    assert field in fields, fields
    assert queued_messages(store) == 0
    assert client.get("/v1/jobs").json()["items"] == []


def test_overcomplete_without_a_regularizer_is_accepted_with_a_warning(client: TestClient) -> None:
    plain = client.post("/v1/jobs", json=_with("model.latent_dim", 128))
    assert plain.status_code == 201
    assert any("overcomplete" in w for w in plain.json()["warnings"])
    sparse = _with("model.latent_dim", 128)
    sparse["model"]["code_activation"] = "sigmoid"
    sparse["objective"]["sparsity"] = {"type": "kl", "target": 0.05, "weight": 0.5}
    regularized = client.post("/v1/jobs", json=sparse)
    assert regularized.status_code == 201 and regularized.json()["warnings"] == []


def test_a_field_with_no_effect_is_refused_naming_it_or_a_warning_on_the_record(
    client: TestClient, store: JobStore
) -> None:
    # The new user: activation applies to hidden layers only, and there are none.
    linear_code = _with("model", {"hidden": [], "latent_dim": 16, "activation": "sigmoid"})
    linear_code["objective"]["sparsity"] = {"type": "kl", "target": 0.05}
    refused = client.post("/v1/jobs", json=linear_code)
    assert refused.status_code == 422
    (error,) = refused.json()["detail"]
    assert error["field"] == "model.activation"  # what they wrote, not code_activation
    assert "code_activation: sigmoid" in error["msg"]  # what to write instead
    assert queued_messages(store) == 0

    sparse_off = _with("objective.sparsity", {"type": "l1", "weight": 0})
    accepted = client.post("/v1/jobs", json=sparse_off)
    assert accepted.status_code == 201
    (warning,) = accepted.json()["warnings"]
    assert warning.startswith("objective.sparsity.weight: 0 turns the l1 penalty off")
    record = client.get(f"/v1/jobs/{accepted.json()['id']}").json()
    assert record["warnings"] == [warning]


def test_a_check_across_fields_in_a_stacked_layer_names_the_layer(client: TestClient) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "stacked-digits.yaml"
    spec = yaml.safe_load(example.read_text())
    spec["layers"][1]["activation"] = "relu"
    spec["layers"][1]["objective"] = {"loss": "mse", "sparsity": {"type": "kl", "target": 0.05}}
    response = client.post("/v1/jobs", json=spec)
    assert response.status_code == 422
    fields = [error["field"] for error in response.json()["detail"]]
    assert fields == ["layers.1.objective.sparsity"], response.json()


def test_every_example_spec_is_accepted(client: TestClient) -> None:
    examples = sorted(Path(__file__).resolve().parents[2].glob("examples/*.yaml"))
    assert len(examples) >= 10
    for path in examples:
        response = client.post("/v1/jobs", json=yaml.safe_load(path.read_text()))
        assert response.status_code == 201, (path.name, response.json())


def test_spec_without_kind_names_kind(client: TestClient) -> None:
    spec = digits_spec()
    del spec["kind"]
    response = client.post("/v1/jobs", json=spec)
    assert response.status_code == 422
    assert [e["field"] for e in response.json()["detail"]] == ["kind"]


def test_unknown_job_is_404_everywhere(client: TestClient) -> None:
    for method, path in [
        ("GET", "/v1/jobs/j-nope"),
        ("POST", "/v1/jobs/j-nope/cancel"),
        ("GET", "/v1/jobs/j-nope/result"),
        ("GET", "/v1/jobs/j-nope/artifacts/result.json"),
        ("GET", "/v1/jobs/j-nope/encoder"),
    ]:
        response = client.request(method, path)
        assert response.status_code == 404, (method, path)
        assert "j-nope" in response.json()["detail"]


def test_result_and_artifacts_of_an_unfinished_job_are_409(client: TestClient) -> None:
    job_id = client.post("/v1/jobs", json=digits_spec()).json()["id"]
    assert client.get(f"/v1/jobs/{job_id}/result").status_code == 409
    assert client.get(f"/v1/jobs/{job_id}/encoder").status_code == 409
    assert client.get(f"/v1/jobs/{job_id}/artifacts/encoder.pt").status_code == 409


def test_encoder_format_is_checked(client: TestClient) -> None:
    job_id = client.post("/v1/jobs", json=digits_spec()).json()["id"]
    response = client.get(f"/v1/jobs/{job_id}/encoder", params={"format": "pickle"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "format"


def test_cancel_of_a_queued_job_is_final(client: TestClient, store: JobStore) -> None:
    job_id = client.post("/v1/jobs", json=digits_spec()).json()["id"]
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 200
    assert response.json()["state"] == "cancelled"
    assert response.json()["finished_at"] is not None
    again = client.post(f"/v1/jobs/{job_id}/cancel")
    assert again.status_code == 409
    # The queue message is still there, but no runner can take a cancelled job.
    assert store.claim("test-consumer", lease_ttl_s=5, block_ms=10) is None


def test_idempotency_key_makes_a_retry_safe(client: TestClient, store: JobStore) -> None:
    headers = {"Idempotency-Key": "retry-me"}
    first = client.post("/v1/jobs", json=digits_spec(), headers=headers)
    second = client.post("/v1/jobs", json=digits_spec(), headers=headers)
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["id"] == second.json()["id"]
    assert queued_messages(store) == 1
    other = client.post("/v1/jobs", json=digits_spec(epochs=7), headers=headers)
    assert other.status_code == 409
    assert "Idempotency-Key" in other.json()["detail"]


def test_list_filters_by_state_and_pages_with_a_cursor(client: TestClient) -> None:
    ids = [client.post("/v1/jobs", json=digits_spec()).json()["id"] for _ in range(5)]
    client.post(f"/v1/jobs/{ids[1]}/cancel")
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/jobs", params=params).json()
        seen += [job["id"] for job in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    cancelled = client.get("/v1/jobs", params={"state": "cancelled"}).json()["items"]
    assert [job["id"] for job in cancelled] == [ids[1]]
    assert client.get("/v1/jobs", params={"state": "bogus"}).status_code == 422


def test_health_and_readiness(client: TestClient, store: JobStore) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    not_ready = client.get("/readyz")
    assert not_ready.status_code == 503
    assert "dispatcher" in not_ready.json()["reason"]
    store.dispatchers.register("d1", {"id": "d1"}, ttl_s=5)
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["ready"] is True and ready.json()["dispatchers"] == 1


def test_redis_down_is_503_not_500(tmp_path: Any) -> None:
    settings = Settings(home=tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}/0", auth="off",
                        allowed_hosts="testserver")  # fmt: skip
    with TestClient(create_app(settings)) as down:
        response = down.get("/v1/jobs/anything")
        assert response.status_code == 503
        assert "Redis" in response.json()["detail"]
        assert down.post("/v1/jobs", json=digits_spec()).status_code == 503
        assert down.get("/readyz").status_code == 503


def test_a_tenant_past_its_open_job_limit_gets_429_with_retry_after(
    settings: Settings, store: JobStore
) -> None:
    limited = settings.model_copy(update={"max_open_jobs": 2})
    with TestClient(create_app(limited)) as client:
        ids = [client.post("/v1/jobs", json=digits_spec()).json()["id"] for _ in range(2)]
        refused = client.post("/v1/jobs", json=digits_spec())
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "30" and "limit" in refused.json()["detail"]
        assert queued_messages(store) == 2
        client.post(f"/v1/jobs/{ids[0]}/cancel")
        assert client.post("/v1/jobs", json=digits_spec()).status_code == 201

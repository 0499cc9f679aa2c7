"""The pipelines' settings over HTTP: a setting the head's method does not read is a 422
naming it, and what the job record shows of a stack's baseline stage."""

from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _example(name: str) -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    return spec


@pytest.mark.parametrize(
    ("head", "field"),
    [
        ({"method": "mlp", "neighbors": 10}, "head.neighbors"),
        ({"method": "joint", "alpha": 0.9}, "head.alpha"),
        ({"method": "label_spreading", "reconstruction_weight": 2.0}, "head.reconstruction_weight"),
        ({"method": "tsvm"}, "head.method"),
        ({"method": "label_spreading", "min_confidence": 1.5}, "head.min_confidence"),
    ],
)  # fmt: skip
def test_a_head_setting_of_another_method_is_422_naming_it(
    client: TestClient, head: dict[str, Any], field: str
) -> None:
    spec = _example("semisupervised-digits.yaml")
    spec["head"] = head
    response = client.post("/v1/jobs", json=spec)
    assert response.status_code == 422
    assert [error["field"] for error in response.json()["detail"]] == [field], response.json()


def test_a_stack_lists_its_baseline_stage_unless_turned_off(client: TestClient) -> None:
    spec = _example("stacked-digits.yaml")
    record = client.post("/v1/jobs", json=spec).json()
    baseline = record["stages"][-1]
    assert (baseline["name"], baseline["needs"], baseline["epochs"]) == ("baseline", [], 350)
    spec["baseline"] = False
    names = [s["name"] for s in client.post("/v1/jobs", json=spec).json()["stages"]]
    assert names == ["layer1", "layer2", "layer3", "finetune"]

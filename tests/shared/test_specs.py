"""The job spec: the example validates, every bound is a ValidationError naming its field."""

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from shared.specs import (
    JOB_SPEC_ADAPTER,
    MAX_PARAMETERS,
    UNION_TAGS,
    AutoencoderSpec,
    DenseModelSpec,
    parse_job_spec,
)
from tests.specs import digits_spec, set_field

EXAMPLE: dict[str, Any] = {
    "kind": "autoencoder",
    "name": "digits-dense",
    "data": {"dataset": "digits", "validation_fraction": 0.2, "seed": 0},
    "model": {"arch": "dense", "hidden": [128], "latent_dim": 16, "activation": "relu"},
    "objective": {"loss": "mse"},
    "training": {"epochs": 30, "batch_size": 128, "lr": 0.001, "seed": 0, "checkpoint_every": 5},
    "resources": {"workers": 1},
}


def example() -> dict[str, Any]:
    return copy.deepcopy(EXAMPLE)


def errors_of(data: object) -> list[dict[str, Any]]:
    with pytest.raises(ValidationError) as info:
        parse_job_spec(data)
    return [dict(error) for error in info.value.errors(include_url=False)]


def test_example_validates_from_a_dict() -> None:
    spec = parse_job_spec(example())
    assert isinstance(spec, AutoencoderSpec)
    assert spec.kind == "autoencoder" and spec.name == "digits-dense"
    assert spec.data.dataset == "digits" and spec.data.input_dim == 64
    assert spec.model.hidden == (128,) and spec.model.latent_dim == 16
    assert spec.objective.loss == "mse"
    assert spec.training.epochs == 30 and spec.training.lr == pytest.approx(0.001)
    assert spec.resources.workers == 1
    # defaults fill what the document leaves out
    assert spec.data.normalize == "minmax" and spec.training.optimizer == "adam"


def test_example_validates_from_json_text() -> None:
    text = json.dumps(EXAMPLE)
    from_json = JOB_SPEC_ADAPTER.validate_json(text)
    assert from_json == parse_job_spec(json.loads(text)) == parse_job_spec(example())


def test_spec_round_trips_through_its_json() -> None:
    spec = parse_job_spec(example())
    assert JOB_SPEC_ADAPTER.validate_json(spec.model_dump_json()) == spec


def test_the_test_suites_digits_spec_validates() -> None:
    spec = parse_job_spec(digits_spec(epochs=4, workers=2))
    assert spec.training.epochs == 4 and spec.resources.workers == 2


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        set_field(doc, path, value)

    return mutate


@pytest.mark.parametrize(
    ("mutate", "loc", "error_type"),
    [
        (_set("training.epochs", -1), ("training", "epochs"), "greater_than_equal"),
        (_set("training.epochs", 0), ("training", "epochs"), "greater_than_equal"),
        (_set("training.epochs", 10_001), ("training", "epochs"), "less_than_equal"),
        (_set("model.latent_dim", 0), ("model", "latent_dim"), "greater_than_equal"),
        (_set("model.hidden", [128, 0]), ("model", "hidden", 1), "greater_than_equal"),
        (_set("training.lr", "fast"), ("training", "lr"), "float_parsing"),
        (_set("training.batch_size", "lots"), ("training", "batch_size"), "int_parsing"),
        (_set("training.lr", 0.0), ("training", "lr"), "greater_than"),
        (_set("data.validation_fraction", 0.9), ("data", "validation_fraction"), "less_than_equal"),
        (_set("data.dataset", "mnist"), ("data", "dataset"), "value_error"),
        (_set("resources.workers", 0), ("resources", "workers"), "greater_than_equal"),
        (_set("training.epoch", 3), ("training", "epoch"), "extra_forbidden"),
        (_set("modle", {"latent_dim": 4}), ("modle",), "extra_forbidden"),
        (_set("objective.loss", "huber"), ("objective", "loss"), "literal_error"),
        (_set("name", "bad/name"), ("name",), "string_pattern_mismatch"),
    ],
)
def test_a_bad_field_is_an_error_whose_loc_names_it(
    mutate: Callable[[dict[str, Any]], None], loc: tuple[str | int, ...], error_type: str
) -> None:
    doc = example()
    mutate(doc)
    errors = errors_of(doc)
    assert len(errors) == 1, errors
    # discriminated unions put their tags (kind, arch) into the location
    assert errors[0]["loc"][0] == "autoencoder"
    assert tuple(p for p in errors[0]["loc"] if p not in UNION_TAGS) == loc
    assert errors[0]["type"] == error_type


def test_unknown_dataset_lists_the_built_in_ones() -> None:
    doc = example()
    doc["data"]["dataset"] = "mnist"
    (error,) = errors_of(doc)
    assert "'mnist'" in error["msg"]
    assert "digits" in error["msg"] and "swiss_roll" in error["msg"]


def test_unknown_kind_is_one_error_about_kind() -> None:
    doc = example()
    doc["kind"] = "vae"
    errors = errors_of(doc)
    # one error about the tag, not one per union member's failures
    assert len(errors) == 1
    (error,) = errors
    assert error["type"] == "union_tag_invalid"
    assert error["ctx"]["discriminator"] == "'kind'"
    assert error["ctx"]["tag"] == "vae"
    assert "'autoencoder'" in error["ctx"]["expected_tags"]


def test_missing_kind_is_one_error_about_kind() -> None:
    doc = example()
    del doc["kind"]
    (error,) = errors_of(doc)
    assert error["type"] == "union_tag_not_found"
    assert error["ctx"]["discriminator"] == "'kind'"


def test_too_many_parameters_is_refused_naming_the_model() -> None:
    doc = example()
    doc["model"]["hidden"] = [8192, 8192, 8192]
    assert DenseModelSpec(hidden=[8192] * 3, latent_dim=16).parameter_count(64) > MAX_PARAMETERS
    (error,) = errors_of(doc)
    # a cross-field check: pydantic can only place it at the model level; the message names it
    assert error["loc"] == ("autoencoder",)
    assert error["msg"].startswith("Value error, model:")
    assert f"{MAX_PARAMETERS:,}" in error["msg"]


def test_a_model_just_under_the_parameter_limit_is_accepted() -> None:
    doc = example()
    doc["model"]["hidden"] = [8192, 2048]
    count = DenseModelSpec(hidden=[8192, 2048], latent_dim=16).parameter_count(64)
    assert count <= MAX_PARAMETERS
    assert parse_job_spec(doc).model.hidden == (8192, 2048)


def test_bce_with_standardized_inputs_is_refused_naming_the_loss() -> None:
    doc = example()
    doc["objective"]["loss"] = "bce"
    doc["data"]["normalize"] = "standard"
    (error,) = errors_of(doc)
    assert error["loc"] == ("autoencoder",)
    assert "objective.loss" in error["msg"] and "minmax" in error["msg"]


def test_bce_with_minmax_inputs_is_accepted() -> None:
    doc = example()
    doc["objective"]["loss"] = "bce"
    assert parse_job_spec(doc).objective.loss == "bce"


def test_not_a_mapping_is_a_validation_error() -> None:
    with pytest.raises(ValidationError):
        parse_job_spec(["autoencoder"])
    with pytest.raises(ValidationError):
        parse_job_spec(json.dumps(EXAMPLE))  # text goes through validate_json, not here


def test_specs_are_frozen() -> None:
    spec = parse_job_spec(example())
    with pytest.raises(ValidationError) as top:
        spec.name = "renamed"  # type: ignore[misc]
    assert top.value.errors()[0]["type"] == "frozen_instance"
    with pytest.raises(ValidationError):
        spec.training.epochs = 1  # type: ignore[misc]
    with pytest.raises(ValidationError):
        spec.model.latent_dim = 2  # type: ignore[misc]
    with pytest.raises(ValidationError):
        spec.data.dataset = "swiss_roll"  # type: ignore[misc]
    assert spec.name == "digits-dense" and spec.training.epochs == 30
    assert spec.model.latent_dim == 16 and spec.data.dataset == "digits"


LAYER = {"units": 8, "activation": "sigmoid"}


def _stacked(layers: int) -> dict[str, Any]:
    return {"kind": "stacked", "data": {"dataset": "digits"}, "layers": [LAYER] * layers}


# What would let one job exhaust the cluster: each bound is refused naming its field.
@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({**digits_spec(epochs=10_001)}, "training.epochs"),
        (digits_spec(batch_size=65_537), "training.batch_size"),
        ({**digits_spec(), "model": {"hidden": [8193], "latent_dim": 8}}, "model.hidden.0"),
        ({**digits_spec(), "model": {"hidden": [8] * 9, "latent_dim": 8}}, "model.hidden"),
        ({**digits_spec(), "model": {"latent_dim": 8193}}, "model.latent_dim"),
        ({**digits_spec(), "data": {"dataset": "mnist5k"},
          "model": {"hidden": [8192, 8192], "latent_dim": 8192}}, "model"),
        ({**digits_spec(), "model": {"arch": "conv", "channels": [4] * 7, "latent_dim": 8}},
         "model.channels"),
        ({**digits_spec(), "data": {"dataset": "swiss_roll", "n_samples": 100_001}},
         "data.n_samples"),
        ({**digits_spec(), "resources": {"workers": 65}}, "resources.workers"),
        ({**digits_spec(), "resources": {"gpus_per_worker": 9}}, "resources.gpus_per_worker"),
        ({**digits_spec(), "resources": {"max_failures": 11}}, "resources.max_failures"),
        ({**digits_spec(), "tags": ["t"] * 17}, "tags"),
        (_stacked(9), "layers"),
        ({**_stacked(2), "finetune": {"epochs": 10_001}}, "finetune.epochs"),
    ],
)  # fmt: skip
def test_bounds_that_stop_resource_exhaustion(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_job_spec(spec)
    errors = info.value.errors()
    locs = [".".join(str(p) for p in e["loc"] if p not in UNION_TAGS) for e in errors]
    # a check across fields names its field at the start of its message instead
    assert field in locs or any(f"{field}:" in e["msg"] for e in errors), (locs, errors)

"""The job spec: the example validates, every bound is a ValidationError naming its field, and
a field that the rest of the spec makes pointless is refused naming it or warned about."""

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
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


# ---------------------------------------------------------------------------------------------
# A field that the rest of the spec makes pointless: refused naming it, or a warning


def _one_layer(**model: Any) -> dict[str, Any]:
    doc = example()
    doc["model"] = {"hidden": [], "latent_dim": 16, **model}
    return doc


def _field_blamed(doc: object) -> str:
    """The field a refused spec's one error names: its location, then its message's prefix."""
    (error,) = errors_of(doc)
    loc = [str(p) for p in error["loc"] if p not in UNION_TAGS]
    named = error["msg"].removeprefix("Value error, ").split(":", 1)[0]
    return ".".join([*loc, named]) if " " not in named else ".".join(loc)


def test_an_activation_without_hidden_layers_is_refused_naming_it() -> None:
    # The new user: activation applies to hidden layers only, so this is a linear code.
    doc = _one_layer(activation="sigmoid")
    assert _field_blamed(doc) == "model.activation"
    (error,) = errors_of(doc)
    assert "code_activation: sigmoid" in error["msg"]  # what to write instead


def test_kl_after_an_activation_without_hidden_layers_blames_the_activation_written() -> None:
    doc = _one_layer(activation="sigmoid")
    doc["objective"]["sparsity"] = {"type": "kl"}
    assert _field_blamed(doc) == "model.activation"


def test_kl_on_a_linear_code_blames_sparsity_and_says_code_activation_is_unset() -> None:
    doc = example()  # hidden [128], activation relu, no code_activation written
    doc["objective"]["sparsity"] = {"type": "kl"}
    assert _field_blamed(doc) == "objective.sparsity"
    (error,) = errors_of(doc)
    assert "linear unless set" in error["msg"] and "code_activation: sigmoid" in error["msg"]


@pytest.mark.parametrize(
    "model",
    [
        {"activation": "linear", "code_activation": "linear"},  # examples/digits-linear.yaml
        {"activation": "sigmoid", "code_activation": "sigmoid"},
        {"activation": "relu", "code_activation": "sigmoid"},  # the default, written out
        {"code_activation": "sigmoid"},
    ],
)
def test_an_activation_without_hidden_layers_that_changes_nothing_is_accepted(
    model: dict[str, Any],
) -> None:
    spec = parse_job_spec(_one_layer(**model))
    assert spec.warnings() == []


def test_the_same_activation_check_guards_a_semisupervised_pretrain() -> None:
    model = {"hidden": [], "latent_dim": 8, "activation": "tanh"}
    doc = {"kind": "semisupervised", "data": {"dataset": "digits"}, "labeled_count": 100,
           "pretrain": {"kind": "autoencoder", "model": model}}  # fmt: skip
    assert _field_blamed(doc) == "pretrain.model.activation"


def test_n_samples_on_a_dataset_of_its_own_size_is_refused_naming_it() -> None:
    doc = example()
    doc["data"]["n_samples"] = 500
    assert _field_blamed(doc) == "data.n_samples"
    doc["data"] = {"dataset": "swiss_roll", "n_samples": 500}
    assert parse_job_spec(doc).data.n_samples == 500
    doc["data"] = {"dataset": "digits", "n_samples": 2000}  # the default, written out
    assert parse_job_spec(doc).data.dataset == "digits"


@pytest.mark.parametrize(
    ("model", "field"),
    [
        ({"hidden": [32], "latent_dim": 8, "channels": [4]}, "model.channels"),
        ({"latent_dim": 8, "kernel_size": 5}, "model.kernel_size"),
        ({"arch": "conv", "hidden": [32], "latent_dim": 8}, "model.hidden"),
        ({"arch": "conv", "latent_dim": 8, "tied": True}, "model.tied"),
    ],
)
def test_a_field_of_the_other_architecture_is_refused_naming_it(
    model: dict[str, Any], field: str
) -> None:
    doc = example()
    doc["model"] = model
    assert _field_blamed(doc) == field
    (error,) = errors_of(doc)
    assert "set arch:" in error["msg"]


def test_a_zero_sparsity_weight_is_a_warning_naming_it() -> None:
    doc = _one_layer(code_activation="sigmoid")
    doc["objective"]["sparsity"] = {"type": "kl", "weight": 0}
    (warning,) = parse_job_spec(doc).warnings()
    assert warning.startswith("objective.sparsity.weight:")
    doc["objective"]["sparsity"] = {"type": "l1", "weight": 0.001}
    assert parse_job_spec(doc).warnings() == []


def test_projections_of_a_closed_form_contraction_are_a_warning_naming_them() -> None:
    doc = _one_layer(code_activation="sigmoid")  # examples/digits-contractive.yaml's encoder
    doc["objective"]["contractive"] = {"weight": 0.1, "projections": 4}
    (warning,) = parse_job_spec(doc).warnings()
    assert warning.startswith("objective.contractive.projections:")
    doc["model"]["hidden"] = [32]  # a deep encoder: the estimate uses them
    assert parse_job_spec(doc).warnings() == []


def test_a_stack_layers_warnings_name_the_layer() -> None:
    doc = _stacked(2)
    doc["layers"] = [
        {"units": 16, "objective": {"contractive": {"projections": 3}}},  # sigmoid: closed form
        {"units": 8, "activation": "tanh", "objective": {"contractive": {"projections": 3}}},
    ]
    (warning,) = parse_job_spec(doc).warnings()
    assert warning.startswith("layers.0.objective.contractive.projections:")


def test_kl_on_a_stack_layer_names_the_layers_activation() -> None:
    doc = _stacked(1)
    doc["layers"] = [{"units": 8, "activation": "relu", "objective": {"sparsity": {"type": "kl"}}}]
    (error,) = errors_of(doc)
    assert "layers.0.objective.sparsity:" in error["msg"]
    assert "layers.0.activation to sigmoid" in error["msg"]


@pytest.mark.parametrize(
    ("training", "finetune", "warned"),
    [
        ({"epochs": 30, "checkpoint_every": 50}, None, True),
        ({"epochs": 30, "checkpoint_every": 30}, None, True),
        ({"epochs": 30, "checkpoint_every": 29}, None, False),
        ({"epochs": 3}, None, False),  # the default interval, not written: nothing to say
        ({"epochs": 30, "checkpoint_every": 40}, {"epochs": 50}, False),  # finetune uses it
    ],
)
def test_a_checkpoint_interval_past_every_stages_epochs_is_a_warning(
    training: dict[str, Any], finetune: dict[str, Any] | None, warned: bool
) -> None:
    doc = {**_stacked(1), "training": training, "finetune": finetune}
    warnings = parse_job_spec(doc).warnings()
    assert [w.split(":")[0] for w in warnings] == (["training.checkpoint_every"] if warned else [])


def test_pretrain_warnings_are_prefixed_with_pretrain() -> None:
    doc = {"kind": "semisupervised", "data": {"dataset": "digits"}, "labeled_count": 100,
           "pretrain": {"kind": "autoencoder", "model": {"latent_dim": 100},
                        "training": {"epochs": 10, "checkpoint_every": 10}}}  # fmt: skip
    warnings = parse_job_spec(doc).warnings()
    assert sorted(w.split(":")[0] for w in warnings) == [
        "pretrain.model.latent_dim",  # overcomplete, unregularized
        "pretrain.training.checkpoint_every",
    ]


def test_refusals_and_warnings_survive_the_specs_round_trip() -> None:
    # Specs are dumped whole and parsed again (uploads, workers, Redis): defaults written out
    # must never turn into a refusal or a new warning.
    for path in sorted(Path(__file__).resolve().parents[2].glob("examples/*.yaml")):
        spec = parse_job_spec(yaml.safe_load(path.read_text()))
        again = JOB_SPEC_ADAPTER.validate_json(spec.model_dump_json())
        assert again == spec and again.warnings() == spec.warnings() == [], path.name


# ---------------------------------------------------------------------------------------------
# Semi-supervised methods and the stacked baseline


def _semisupervised(**head: Any) -> dict[str, Any]:
    return {"kind": "semisupervised", "data": {"dataset": "digits"}, "labeled_fraction": 0.05,
            "pretrain": {"kind": "autoencoder", "model": {"latent_dim": 16}},
            "head": head}  # fmt: skip


@pytest.mark.parametrize(
    ("head", "field"),
    [
        ({"method": "mlp", "reconstruction_weight": 0.5}, "head.reconstruction_weight"),
        ({"neighbors": 5}, "head.neighbors"),  # method defaults to mlp
        ({"method": "joint", "alpha": 0.5}, "head.alpha"),
        ({"method": "joint", "min_confidence": 0.5}, "head.min_confidence"),
        ({"method": "label_spreading", "reconstruction_weight": 1.0}, "head.reconstruction_weight"),
        ({"method": "tsvm"}, "head.method"),
        ({"method": "label_spreading", "neighbors": 0}, "head.neighbors"),
        ({"method": "label_spreading", "neighbors": 101}, "head.neighbors"),
        ({"method": "label_spreading", "alpha": 1.0}, "head.alpha"),
        ({"method": "label_spreading", "min_confidence": 1.0}, "head.min_confidence"),
        ({"method": "joint", "reconstruction_weight": 0}, "head.reconstruction_weight"),
    ],
)  # fmt: skip
def test_a_setting_the_heads_method_does_not_read_is_refused_naming_it(
    head: dict[str, Any], field: str
) -> None:
    assert _field_blamed(_semisupervised(**head)) == field


def test_more_neighbors_than_training_inputs_is_refused_naming_neighbors() -> None:
    doc = _semisupervised(method="label_spreading", neighbors=60)
    doc["data"] = {"dataset": "ds-0123456789abcdef01234567",
                   "upload": {"input_shape": [4], "rows": 100, "classes": 3}}  # fmt: skip
    # 100 rows: 80 after the test split, 64 after validation; 60 neighbors fit, 64 do not.
    assert parse_job_spec(doc).training_rows() == 64  # type: ignore[union-attr]
    doc["head"]["neighbors"] = 64
    assert _field_blamed(doc) == "head.neighbors"
    (error,) = errors_of(doc)
    assert "64 training inputs" in error["msg"]


def test_each_method_reads_its_own_settings_with_defaults() -> None:
    mlp = parse_job_spec(_semisupervised()).head  # type: ignore[union-attr]
    assert mlp.method == "mlp" and mlp.hidden == (64,)
    joint = parse_job_spec(_semisupervised(method="joint")).head  # type: ignore[union-attr]
    assert joint.joint_weight == 1.0
    spread = parse_job_spec(_semisupervised(  # type: ignore[union-attr]
        method="label_spreading", neighbors=7, min_confidence=0.5)).head  # fmt: skip
    assert (spread.graph_neighbors, spread.spread_alpha, spread.kept_confidence) == (7, 0.99, 0.5)


def test_a_joint_head_with_finetune_encoder_is_a_warning_naming_it() -> None:
    doc = {**_semisupervised(method="joint"), "finetune_encoder": True}
    (note,) = parse_job_spec(doc).warnings()
    assert note.startswith("finetune_encoder: true has no effect with head.method joint")
    assert parse_job_spec(_semisupervised(method="joint")).warnings() == []


def test_method_settings_survive_the_specs_round_trip() -> None:
    spec = parse_job_spec(_semisupervised(method="label_spreading", alpha=0.9))
    again = parse_job_spec(json.loads(spec.model_dump_json()))  # null settings stay unset
    assert again == spec
    mlp = parse_job_spec(_semisupervised())
    assert parse_job_spec(json.loads(mlp.model_dump_json())) == mlp


def test_a_stack_trains_its_baseline_from_scratch_by_default_for_as_long_as_all_its_stages(
) -> None:  # fmt: skip
    spec = parse_job_spec({**_stacked(3), "training": {"epochs": 7, "lr": 0.01},
                           "finetune": {"epochs": 5, "lr": 0.002}})  # fmt: skip
    assert spec.baseline is True  # type: ignore[union-attr]
    assert spec.scratch_epochs == 3 * 7 + 5 and spec.scratch_lr == 0.002  # type: ignore[union-attr]
    plain = parse_job_spec({**_stacked(2), "training": {"epochs": 4, "lr": 0.01}})
    assert plain.scratch_epochs == 8 and plain.scratch_lr == 0.01  # type: ignore[union-attr]
    assert parse_job_spec({**_stacked(2), "baseline": False}).baseline is False  # type: ignore[union-attr]

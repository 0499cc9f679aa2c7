"""docs/spec.schema.json and docs/spec.md's field reference: generated from the models, checked
in, and equal to what the models say now (so a changed field that was not regenerated fails)."""

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from jsonschema.exceptions import best_match

from shared.spec_schema import (
    BEGIN,
    END,
    expected_files,
    main,
    model_schema,
    reference_markdown,
    spec_schema,
)
from shared.specs import parse_job_spec

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
EXAMPLES = sorted(ROOT.glob("examples/*.yaml"))


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads((DOCS / "spec.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_the_committed_schema_and_reference_are_what_the_models_generate() -> None:
    for path, expected in expected_files(DOCS).items():
        assert path.read_text(encoding="utf-8") == expected, (
            f"{path.relative_to(ROOT)} is out of date: run `python -m shared.spec_schema`"
        )


def test_check_mode_reports_a_stale_file_and_changes_nothing(tmp_path: Path) -> None:
    (tmp_path / "spec.md").write_text(f"# prose\n\n{BEGIN}\nold tables\n{END}\nmore prose\n")
    assert main(["--docs", str(tmp_path), "--check"]) == 1
    assert not (tmp_path / "spec.schema.json").exists()
    assert main(["--docs", str(tmp_path)]) == 0
    written = (tmp_path / "spec.md").read_text()
    assert written.startswith("# prose\n\n") and written.endswith(f"{END}\nmore prose\n")
    assert "old tables" not in written and "### AutoencoderSpec" in written
    assert main(["--docs", str(tmp_path), "--check"]) == 0


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates_against_the_schema(
    validator: jsonschema.Draft202012Validator, path: Path
) -> None:
    errors = [e.message for e in validator.iter_errors(yaml.safe_load(path.read_text()))]
    assert errors == []


def test_there_are_examples_of_every_kind() -> None:
    kinds = {yaml.safe_load(path.read_text())["kind"] for path in EXAMPLES}
    assert kinds == {"autoencoder", "stacked", "semisupervised"}


def test_every_spec_in_the_docs_validates_against_the_schema_and_the_models(
    validator: jsonschema.Draft202012Validator,
) -> None:
    text = (DOCS / "spec.md").read_text(encoding="utf-8")
    documents = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    specs = [doc for doc in documents if isinstance(doc, dict) and "data" in doc]
    assert len(specs) >= 3
    for doc in specs:
        assert [e.message for e in validator.iter_errors(doc)] == [], doc
        parse_job_spec(doc)


def _example() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "examples/digits-dense.yaml").read_text())
    return doc


@pytest.mark.parametrize(
    ("path", "value", "where", "says"),
    [
        (("training", "epoch"), 3, ["training"], "'epoch' was unexpected"),
        (("modle",), {"latent_dim": 4}, [], "'modle' was unexpected"),
        (("model", "channels"), [4], ["model"], "'channels' was unexpected"),
        (("objective", "sparsity"), {"type": "l1", "wieght": 1}, ["objective", "sparsity"],
         "'wieght' was unexpected"),
        (("training", "epochs"), 10_001, ["training", "epochs"], "10000"),
        (("data", "dataset"), "mnist", ["data", "dataset"], "'mnist'"),
        (("kind",), "vae", ["kind"], "'vae'"),
    ],
)  # fmt: skip
def test_the_schema_rejects_a_typo_where_it_is(
    validator: jsonschema.Draft202012Validator,
    path: tuple[str, ...],
    value: object,
    where: list[str],
    says: str,
) -> None:
    doc = _example()
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    error = best_match(validator.iter_errors(doc))
    assert error is not None
    # a tagged union is `if`/`then` in the schema, so the error is at the typo, not the root
    assert list(error.absolute_path) == where and says in error.message, error.message


def test_a_spec_without_a_kind_is_one_error_about_kind(
    validator: jsonschema.Draft202012Validator,
) -> None:
    doc = _example()
    del doc["kind"]
    assert [e.message for e in validator.iter_errors(doc)] == ["'kind' is a required property"]


def test_a_model_without_arch_is_dense_and_a_conv_one_is_checked_as_conv(
    validator: jsonschema.Draft202012Validator,
) -> None:
    doc = _example()
    doc["model"] = {"hidden": [32], "latent_dim": 8}
    assert list(validator.iter_errors(doc)) == []
    doc["model"] = {"arch": "conv", "channels": [8] * 7, "latent_dim": 8}
    error = best_match(validator.iter_errors(doc))
    assert error is not None and list(error.absolute_path) == ["model", "channels"]


def test_every_field_of_the_reference_has_a_type_and_a_description() -> None:
    rows = [line for line in reference_markdown().splitlines() if line.startswith("| `")]
    assert len(rows) > 60
    for row in rows:
        field, kind, default, _constraints, description = (
            cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]
        )
        assert kind and default and description, row


def test_every_model_of_the_spec_has_a_section_and_a_description() -> None:
    defs = model_schema()["$defs"]
    reference = reference_markdown()
    for name, model in defs.items():
        if name == "UploadedData":  # set by the server; not a part a user writes
            assert f"### {name}\n" not in reference
            continue
        assert f"### {name}\n" in reference and model.get("description"), name


def test_the_server_set_upload_is_read_only_in_the_schema() -> None:
    upload = spec_schema()["$defs"]["DataSpec"]["properties"]["upload"]
    assert upload["readOnly"] is True

"""Reading a job spec from a YAML or JSON file, with messages that name the file."""

import json
import os
from pathlib import Path
from typing import Any

import yaml


class SpecFileError(ValueError):
    """A spec file that cannot be read, or is not a YAML or JSON mapping."""


def read_spec(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The spec document in `path`: JSON if it ends in .json, else YAML (JSON is YAML too)."""
    path = Path(path)
    language = "JSON" if path.suffix == ".json" else "YAML"
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecFileError(f"cannot read {path}: {exc.strerror}") from None
    try:
        spec = json.loads(text) if language == "JSON" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise SpecFileError(f"{path} is not valid {language}: {exc}") from None
    if not isinstance(spec, dict):
        raise SpecFileError(f"{path}: a job spec is a mapping (kind, data, model, ...)")
    return spec

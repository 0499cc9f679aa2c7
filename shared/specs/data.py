"""`data`: DataSpec, what to train on, and the built-in datasets' shapes and sizes."""

import math
from typing import Literal

from pydantic import Field, JsonValue, field_validator, model_validator
from typing_extensions import TypeAliasType

from shared.datasets import DATASET_ID, UploadedData
from shared.specs.base import FrozenSpec

# Input shapes of the built-in datasets (channels, height, width for images): the spec checks
# shapes and sizes before anything is queued.
LABELED_DATASETS = frozenset({"digits", "mnist5k"})
GENERATED_DATASETS = frozenset({"swiss_roll", "s_curve"})  # sized by data.n_samples
BUILTIN_DATASETS: dict[str, tuple[int, ...]] = {
    "digits": (1, 8, 8),
    "mnist5k": (1, 28, 28),
    "swiss_roll": (3,),
    "s_curve": (3,),
}
# Rows of the built-in datasets of fixed size (the manifolds have data.n_samples).
BUILTIN_ROWS = {"digits": 1797, "mnist5k": 5000}
N_SAMPLES_DEFAULT = 2000


# _known_dataset's rule as a JSON schema can say it, so editors complete names and flag typos.
_BUILTIN_NAMES: list[JsonValue] = [*sorted(BUILTIN_DATASETS)]
DATASET_SCHEMA: dict[str, JsonValue] = {
    "anyOf": [
        {"type": "string", "enum": _BUILTIN_NAMES, "title": "BuiltinDataset"},
        {"type": "string", "pattern": DATASET_ID.pattern, "title": "UploadId"},
    ]
}


Normalization = TypeAliasType("Normalization", Literal["minmax", "standard", "none"])


class DataSpec(FrozenSpec):
    """`data`: what to train on, how it is split and normalized."""

    dataset: str = Field(
        description="a built-in dataset (digits: 1x8x8 with labels; mnist5k: 1x28x28 with "
        "labels; swiss_roll, s_curve: 3-D manifolds) or the id of an upload (ds-...)",
        json_schema_extra=DATASET_SCHEMA,
    )
    validation_fraction: float = Field(
        default=0.2, gt=0.0, le=0.5,
        description="share held out for validation (of what the test split leaves, in a "
        "semisupervised job); stratified when there are labels",
    )  # fmt: skip
    seed: int = Field(
        default=0, ge=0, le=2**31 - 1,
        description="seed of the splits and of generated datasets; in a semisupervised job "
        "also of the labeled subset and the initial weights",
    )  # fmt: skip
    normalize: Normalization = Field(
        default="minmax",
        description="minmax: into [0, 1]; standard: zero mean, unit variance; none: raw. "
        "Fitted on the training split, per feature (one statistic for all pixels of images)",
    )
    n_samples: int = Field(
        default=N_SAMPLES_DEFAULT, ge=100, le=100_000,
        description="samples to generate for swiss_roll and s_curve; other datasets have "
        "their own size, and another value there is refused",
    )  # fmt: skip
    upload: UploadedData | None = Field(
        default=None,
        description="set by the server from its dataset index when `dataset` names an upload; "
        "whatever a client sends here is replaced",
        json_schema_extra={"readOnly": True},
    )

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        if name not in BUILTIN_DATASETS and not DATASET_ID.match(name):
            known = ", ".join(sorted(BUILTIN_DATASETS))
            raise ValueError(f"unknown dataset {name!r}; built-in datasets are: {known}; "
                             "uploads have ids like ds-0123456789abcdef01234567")  # fmt: skip
        return name

    @model_validator(mode="after")
    def _fields_fit_the_dataset(self) -> "DataSpec":
        if self.dataset in BUILTIN_DATASETS and self.upload is not None:
            raise ValueError(f"upload: {self.dataset} is a built-in dataset, not an upload")
        if self.n_samples != N_SAMPLES_DEFAULT and self.dataset not in GENERATED_DATASETS:
            raise ValueError(
                f"n_samples: sets the size of a generated dataset (swiss_roll, s_curve); "
                f"{self.dataset} has a size of its own, so n_samples would have no effect"
            )
        return self

    @property
    def resolved(self) -> bool:
        """Whether the shape is known: a built-in dataset, or an upload the server looked up."""
        return self.dataset in BUILTIN_DATASETS or self.upload is not None

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self.upload is not None:
            return self.upload.input_shape
        if self.dataset not in BUILTIN_DATASETS:
            raise ValueError(f"data.dataset: upload {self.dataset} was not looked up")
        return BUILTIN_DATASETS[self.dataset]

    @property
    def input_dim(self) -> int:
        return math.prod(self.input_shape)

    @property
    def labeled(self) -> bool:
        if self.upload is not None:
            return self.upload.classes > 0
        return self.dataset in LABELED_DATASETS

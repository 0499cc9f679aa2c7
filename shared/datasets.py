"""Uploaded datasets: what the index records of one, and the bounds every upload must meet.

An upload is stored content-addressed: its id is derived from the SHA-256 of the uploaded
bytes, so the same file always gets the same id. What the bytes say about the dataset
(`DatasetFacts`) is stored beside it, so the same file sent again is indexed without being
parsed. A job names it in `data.dataset`, and the API copies what the workers need to know of it
(`UploadedData`) into the job's spec.
"""

import re
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypeAliasType

DATASET_ID = re.compile(r"^ds-[0-9a-f]{24}$")
MIN_ROWS = 10  # fewer leave nothing to validate on
MAX_ROWS = 1_000_000
MAX_FEATURES = 1_048_576  # values per sample (a 1024x1024 image)
MAX_CLASSES = 1000


def dataset_id(sha256_hex: str) -> str:
    return f"ds-{sha256_hex[:24]}"


def input_shape(array_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of one sample as models see it: (D,) for vectors, (C, H, W) for images."""
    sample = array_shape[1:]
    return (1, *sample) if len(sample) == 2 else sample


class UploadedData(BaseModel):
    """What a job's spec carries of an uploaded dataset; the API fills it in from the index."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_shape: tuple[int, ...] = Field(min_length=1, max_length=3)
    rows: int = Field(ge=MIN_ROWS, le=MAX_ROWS)
    classes: int = Field(default=0, ge=0, le=MAX_CLASSES, description="0: no labels")


LabelCounts = TypeAliasType("LabelCounts", dict[str, int])


class DatasetInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    shape: tuple[int, ...] = Field(description="shape of x, rows first")
    dtype: str = Field(description="dtype of x as uploaded; stored as float32")
    label_counts: LabelCounts | None = Field(description="samples per label; null: no y")
    size_bytes: int = Field(description="size of the uploaded file")
    sha256: str
    created_at: datetime

    def as_upload(self) -> UploadedData:
        classes = len(self.label_counts) if self.label_counts else 0
        return UploadedData(
            input_shape=input_shape(self.shape), rows=self.shape[0], classes=classes
        )


class DatasetFacts(BaseModel):
    """What an upload's bytes say of it, whoever sent them: stored as datasets/<id>.json."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    shape: tuple[int, ...] = Field(min_length=2, max_length=4)
    dtype: str
    label_counts: dict[str, int] | None
    size_bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @property
    def id(self) -> str:
        return dataset_id(self.sha256)

    def describe(self, name: str, created_at: datetime) -> DatasetInfo:
        """The index entry of these bytes under one tenant's name for them."""
        fields: dict[str, Any] = self.model_dump()
        return DatasetInfo(id=self.id, name=name, created_at=created_at, **fields)

"""The job spec: what a user asks aetrain to train. Every number has a bound.

A spec is frozen and forbids unknown keys, so a typo is a 422 that names the field.
`JobSpec` is a union discriminated by `kind`; `stacked` and `semisupervised` join it later.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

# Input sizes of the built-in datasets: the spec checks shapes and sizes before anything is queued.
BUILTIN_DATASETS: dict[str, int] = {"digits": 64, "swiss_roll": 3, "s_curve": 3}
MAX_PARAMETERS = 50_000_000

Activation = Literal["relu", "sigmoid", "tanh", "gelu", "linear"]
Width = Annotated[int, Field(ge=1, le=8192)]


class FrozenSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataSpec(FrozenSpec):
    dataset: str = Field(description="a built-in dataset name")
    validation_fraction: float = Field(default=0.2, gt=0.0, le=0.5)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    normalize: Literal["minmax", "standard", "none"] = "minmax"
    n_samples: int = Field(
        default=2000, ge=100, le=100_000, description="size of generated datasets (manifolds)"
    )

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        if name not in BUILTIN_DATASETS:
            known = ", ".join(sorted(BUILTIN_DATASETS))
            raise ValueError(f"unknown dataset {name!r}; built-in datasets are: {known}")
        return name

    @property
    def input_dim(self) -> int:
        return BUILTIN_DATASETS[self.dataset]


class DenseModelSpec(FrozenSpec):
    arch: Literal["dense"] = "dense"
    hidden: tuple[Width, ...] = Field(default=(), max_length=8)
    latent_dim: Width
    activation: Activation = "relu"
    code_activation: Activation = Field(
        default="linear", description="activation of the code layer (sigmoid for a 0..1 code)"
    )
    tied: bool = Field(default=False, description="decoder weights are the encoder's, transposed")

    def parameter_count(self, input_dim: int) -> int:
        sizes = [input_dim, *self.hidden, self.latent_dim]
        weights = sum(a * b for a, b in zip(sizes, sizes[1:], strict=False))
        biases = sum(sizes[1:]) + sum(sizes[:-1])
        return biases + weights * (1 if self.tied else 2)


class ObjectiveSpec(FrozenSpec):
    loss: Literal["mse", "bce"] = "mse"


class TrainingSpec(FrozenSpec):
    epochs: int = Field(default=30, ge=1, le=10_000)
    batch_size: int = Field(default=128, ge=1, le=65_536)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    checkpoint_every: int = Field(default=5, ge=1, le=10_000)
    checkpoints_to_keep: int = Field(default=2, ge=1, le=100)


class ResourcesSpec(FrozenSpec):
    workers: int = Field(default=1, ge=1, le=64, description="DDP ranks")
    gpus_per_worker: float = Field(default=0, ge=0, le=8)
    cpus_per_worker: float = Field(default=1, gt=0, le=64)
    max_failures: int = Field(default=0, ge=0, le=10, description="worker-group restarts")


class JobSpecBase(FrozenSpec):
    name: str = Field(default="", max_length=100, pattern=r"^[A-Za-z0-9_.\- ]*$")
    priority: int = Field(default=0, ge=0, le=9)
    tags: tuple[Annotated[str, Field(min_length=1, max_length=64)], ...] = Field(
        default=(), max_length=16
    )
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)


class AutoencoderSpec(JobSpecBase):
    kind: Literal["autoencoder"]
    data: DataSpec
    model: DenseModelSpec
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)

    @model_validator(mode="after")
    def _fits_limits(self) -> "AutoencoderSpec":
        count = self.model.parameter_count(self.data.input_dim)
        if count > MAX_PARAMETERS:
            raise ValueError(f"model: {count:,} parameters exceed the limit of {MAX_PARAMETERS:,}")
        if self.objective.loss == "bce" and self.data.normalize != "minmax":
            raise ValueError(
                "objective.loss: bce needs inputs in [0, 1]; set data.normalize to minmax"
            )
        return self


# A one-member union for now; `Field(discriminator="kind")` is what makes an unknown kind a
# clear error about `kind` rather than a list of every member's failures.
JobSpec = Annotated[AutoencoderSpec, Field(discriminator="kind")]
JOB_SPEC_ADAPTER: TypeAdapter[AutoencoderSpec] = TypeAdapter(JobSpec)


def parse_job_spec(data: object) -> AutoencoderSpec:
    """Validate a decoded JSON/YAML document as a JobSpec."""
    return JOB_SPEC_ADAPTER.validate_python(data)

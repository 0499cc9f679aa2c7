"""The job spec: what a user asks aetrain to train. Every number has a bound.

A spec is frozen and forbids unknown keys, so a typo is a 422 that names the field.
`JobSpec` is a union discriminated by `kind`; `stacked` and `semisupervised` join it later.
"""

import math
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    field_validator,
    model_validator,
)

from shared.datasets import DATASET_ID, UploadedData

# Input shapes of the built-in datasets (channels, height, width for images): the spec checks
# shapes and sizes before anything is queued.
LABELED_DATASETS = frozenset({"digits", "mnist5k"})
BUILTIN_DATASETS: dict[str, tuple[int, ...]] = {
    "digits": (1, 8, 8),
    "mnist5k": (1, 28, 28),
    "swiss_roll": (3,),
    "s_curve": (3,),
}
MAX_PARAMETERS = 50_000_000

Activation = Literal["relu", "sigmoid", "tanh", "gelu", "linear"]
Width = Annotated[int, Field(ge=1, le=8192)]


class FrozenSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataSpec(FrozenSpec):
    dataset: str = Field(description="a built-in dataset name, or the id of an upload (ds-...)")
    validation_fraction: float = Field(default=0.2, gt=0.0, le=0.5)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    normalize: Literal["minmax", "standard", "none"] = "minmax"
    n_samples: int = Field(
        default=2000, ge=100, le=100_000, description="size of generated datasets (manifolds)"
    )
    upload: UploadedData | None = Field(
        default=None,
        description="set by the server from its dataset index when `dataset` names an upload; "
        "whatever a client sends here is replaced",
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
    def _upload_only_for_uploads(self) -> "DataSpec":
        if self.dataset in BUILTIN_DATASETS and self.upload is not None:
            raise ValueError(f"upload: {self.dataset} is a built-in dataset, not an upload")
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


class ConvModelSpec(FrozenSpec):
    arch: Literal["conv"]
    channels: tuple[Annotated[int, Field(ge=1, le=1024)], ...] = Field(
        default=(16, 32), min_length=1, max_length=6
    )
    kernel_size: int = Field(default=3, ge=1, le=11)
    stride: int = Field(default=2, ge=1, le=4)
    latent_dim: Width
    activation: Activation = "relu"
    code_activation: Activation = "linear"

    @property
    def padding(self) -> int:
        return self.kernel_size // 2

    def feature_shapes(self, input_shape: tuple[int, ...]) -> list[tuple[int, int, int]]:
        """(C, H, W) after each conv layer, input first; ValueError if a shape cannot work.

        With padding k // 2 every size n >= 1 maps to an n2 >= 1 from which a transposed
        convolution gets back to n with an output padding in [0, stride): the decoder can
        always mirror the encoder exactly (models.ConvAutoencoder computes that padding).
        """
        if len(input_shape) != 3:
            raise ValueError(
                f"model.arch: conv needs image-shaped data (C, H, W); this dataset is {input_shape}"
            )
        shapes = [(input_shape[0], input_shape[1], input_shape[2])]
        for channels in self.channels:
            _, h, w = shapes[-1]
            h2, w2 = (conv_out(n, self.kernel_size, self.stride, self.padding) for n in (h, w))
            shapes.append((channels, h2, w2))
        return shapes

    def parameter_count(self, input_shape: tuple[int, ...]) -> int:
        shapes = self.feature_shapes(input_shape)
        k2 = self.kernel_size**2
        # per layer: a conv (c_in*c_out*k^2 weights, c_out biases) and its mirror (c_in biases)
        convs = sum(
            2 * a[0] * b[0] * k2 + b[0] + a[0] for a, b in zip(shapes, shapes[1:], strict=False)
        )
        flat = math.prod(shapes[-1])
        return convs + 2 * flat * self.latent_dim + flat + self.latent_dim


def conv_out(n: int, kernel: int, stride: int, padding: int) -> int:
    return (n + 2 * padding - kernel) // stride + 1


def transposed_out(n: int, kernel: int, stride: int, padding: int) -> int:
    """Size out of a ConvTranspose2d without output padding."""
    return (n - 1) * stride - 2 * padding + kernel


def _arch(model: object) -> str:
    """The `arch` tag of a model spec; dense when left out."""
    if isinstance(model, dict):
        return str(model.get("arch", "dense"))
    return str(getattr(model, "arch", "dense"))


ModelSpec = Annotated[
    Annotated[DenseModelSpec, Tag("dense")] | Annotated[ConvModelSpec, Tag("conv")],
    Discriminator(_arch),
]


class KLSparsitySpec(FrozenSpec):
    type: Literal["kl"]
    target: float = Field(default=0.05, gt=0.0, lt=1.0, description="rho")
    weight: float = Field(default=1.0, ge=0.0, le=100.0, description="beta")


class L1SparsitySpec(FrozenSpec):
    type: Literal["l1"]
    weight: float = Field(default=1e-3, ge=0.0, le=100.0)


class GaussianNoiseSpec(FrozenSpec):
    type: Literal["gaussian"]
    std: float = Field(default=0.2, gt=0.0, le=10.0)


class MaskingNoiseSpec(FrozenSpec):
    type: Literal["masking"]
    fraction: float = Field(default=0.25, gt=0.0, lt=1.0)


class SaltPepperNoiseSpec(FrozenSpec):
    type: Literal["salt_pepper"]
    fraction: float = Field(default=0.1, gt=0.0, lt=1.0)


class ContractiveSpec(FrozenSpec):
    weight: float = Field(default=0.1, gt=0.0, le=100.0, description="lambda")
    projections: int = Field(
        default=1, ge=1, le=64, description="random projections of the estimator (deep encoders)"
    )


SparsitySpec = Annotated[KLSparsitySpec | L1SparsitySpec, Field(discriminator="type")]
DenoisingSpec = Annotated[
    GaussianNoiseSpec | MaskingNoiseSpec | SaltPepperNoiseSpec, Field(discriminator="type")
]


class ObjectiveSpec(FrozenSpec):
    loss: Literal["mse", "bce"] = "mse"
    sparsity: SparsitySpec | None = None
    denoising: DenoisingSpec | None = None
    contractive: ContractiveSpec | None = None

    @property
    def is_regularized(self) -> bool:
        return any((self.sparsity, self.denoising, self.contractive))


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
    max_failures: int = Field(
        default=0, ge=0, le=10,
        description="restarts of a stage's worker group after a failure or a stall",
    )  # fmt: skip
    progress_timeout_s: float = Field(
        default=600.0, ge=5.0, le=86_400.0,
        description="a stage that finishes no epoch for this long is stopped and retried",
    )  # fmt: skip


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
    model: ModelSpec
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)

    @model_validator(mode="after")
    def _fits_limits(self) -> "AutoencoderSpec":
        check_autoencoder(self.model, self.objective, self.data)
        return self

    def warnings(self) -> list[str]:
        """What is allowed but probably not what the user wants."""
        return autoencoder_warnings(self.model, self.objective, self.data)


def check_autoencoder(model: "DenseModelSpec | ConvModelSpec", objective: ObjectiveSpec,
                      data: DataSpec, where: str = "") -> None:  # fmt: skip
    """Checks across fields of one autoencoder; `where` prefixes the blamed field."""
    if not data.resolved:  # an upload: checked again once the API has looked up its shape
        return
    if isinstance(model, ConvModelSpec):
        count = model.parameter_count(data.input_shape)
    else:
        count = model.parameter_count(data.input_dim)
    if count > MAX_PARAMETERS:
        raise ValueError(
            f"{where}model: {count:,} parameters exceed the limit of {MAX_PARAMETERS:,}"
        )
    if objective.loss == "bce" and data.normalize != "minmax":
        raise ValueError(
            f"{where}objective.loss: bce needs inputs in [0, 1]; set data.normalize to minmax"
        )
    if isinstance(objective.sparsity, KLSparsitySpec) and model.code_activation != "sigmoid":
        raise ValueError(
            f"{where}objective.sparsity: kl compares mean activations with a target in (0, 1); "
            f"set {where}model.code_activation to sigmoid"
        )


def autoencoder_warnings(model: "DenseModelSpec | ConvModelSpec", objective: ObjectiveSpec,
                         data: DataSpec, where: str = "") -> list[str]:  # fmt: skip
    if data.resolved and model.latent_dim > data.input_dim and not objective.is_regularized:
        return [
            f"{where}overcomplete: latent_dim {model.latent_dim} > input size "
            f"{data.input_dim} with no sparsity, denoising or contractive term; "
            "the model can learn the identity"
        ]
    return []


class LayerSpec(FrozenSpec):
    """One layer of a stacked autoencoder, trained as a one-layer autoencoder of its input."""

    units: Width
    activation: Activation = "sigmoid"
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)

    def as_model(self) -> DenseModelSpec:
        return DenseModelSpec(latent_dim=self.units, code_activation=self.activation)


class FinetuneSpec(FrozenSpec):
    epochs: int = Field(default=20, ge=1, le=10_000)
    lr: float | None = Field(default=None, gt=0.0, le=10.0, description="default: training.lr")


def check_stack(layers: tuple[LayerSpec, ...], data: DataSpec, where: str = "") -> None:
    """Checks of a stack: sizes, and what each layer's objective needs from its input."""
    if not data.resolved:  # an upload: checked again once the API has looked up its shape
        return
    sizes = [data.input_dim, *(layer.units for layer in layers)]
    count = sum(2 * a * b + a + b for a, b in zip(sizes, sizes[1:], strict=False))
    if count > MAX_PARAMETERS:
        raise ValueError(f"{where}layers: {count:,} parameters exceed the limit of "
                         f"{MAX_PARAMETERS:,}")  # fmt: skip
    for i, layer in enumerate(layers):
        field = f"{where}layers.{i}."
        inputs_in_unit_range = (
            data.normalize == "minmax" if i == 0 else layers[i - 1].activation == "sigmoid"
        )
        if layer.objective.loss == "bce" and not inputs_in_unit_range:
            raise ValueError(f"{field}objective.loss: bce needs this layer's inputs in [0, 1]")
        if isinstance(layer.objective.sparsity, KLSparsitySpec) and layer.activation != "sigmoid":
            raise ValueError(f"{field}objective.sparsity: kl needs a sigmoid activation")


class StackedSpec(JobSpecBase):
    kind: Literal["stacked"]
    data: DataSpec
    layers: tuple[LayerSpec, ...] = Field(min_length=1, max_length=8)
    finetune: FinetuneSpec | None = None
    training: TrainingSpec = Field(default_factory=TrainingSpec)

    @model_validator(mode="after")
    def _layers_fit(self) -> "StackedSpec":
        check_stack(self.layers, self.data)
        return self

    def warnings(self) -> list[str]:
        return []


class HeadSpec(FrozenSpec):
    hidden: tuple[Width, ...] = Field(default=(64,), max_length=4)
    epochs: int = Field(default=100, ge=1, le=10_000)
    lr: float = Field(default=3e-3, gt=0.0, le=10.0)
    batch_size: int = Field(default=64, ge=1, le=65_536)


class PretrainAutoencoderSpec(FrozenSpec):
    """The autoencoder of a semisupervised job; its data is the job's."""

    kind: Literal["autoencoder"]
    model: ModelSpec
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    resources: ResourcesSpec | None = None


class PretrainStackedSpec(FrozenSpec):
    kind: Literal["stacked"]
    layers: tuple[LayerSpec, ...] = Field(min_length=1, max_length=8)
    finetune: FinetuneSpec | None = None
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    resources: ResourcesSpec | None = None


PretrainSpec = Annotated[PretrainAutoencoderSpec | PretrainStackedSpec, Field(discriminator="kind")]


class SemisupervisedSpec(JobSpecBase):
    kind: Literal["semisupervised"]
    data: DataSpec
    labeled_fraction: float | None = Field(default=None, gt=0.0, le=1.0)
    labeled_count: int | None = Field(default=None, ge=1, le=1_000_000)
    test_fraction: float = Field(default=0.2, gt=0.0, le=0.5)
    pretrain: PretrainSpec
    head: HeadSpec = Field(default_factory=HeadSpec)
    finetune_encoder: bool = False
    baseline: bool = True

    @model_validator(mode="after")
    def _labels_and_pretrain(self) -> "SemisupervisedSpec":
        if (self.labeled_fraction is None) == (self.labeled_count is None):
            raise ValueError("labeled_fraction: give exactly one of labeled_fraction and "
                             "labeled_count")  # fmt: skip
        if self.data.resolved and not self.data.labeled:
            raise ValueError(f"data.dataset: {self.data.dataset} has no labels; semisupervised "
                             f"needs labels: {', '.join(sorted(LABELED_DATASETS))} or an upload "
                             "with y")  # fmt: skip
        if isinstance(self.pretrain, PretrainAutoencoderSpec):
            check_autoencoder(self.pretrain.model, self.pretrain.objective, self.data, "pretrain.")
        else:
            check_stack(self.pretrain.layers, self.data, "pretrain.")
        return self

    def warnings(self) -> list[str]:
        if isinstance(self.pretrain, PretrainAutoencoderSpec):
            return autoencoder_warnings(
                self.pretrain.model, self.pretrain.objective, self.data, "pretrain: "
            )
        return []


# Tags of every discriminated union in a spec: they appear in validation error locations.
UNION_TAGS = frozenset(
    {"autoencoder", "stacked", "semisupervised", "dense", "conv", "kl", "l1", "gaussian",
     "masking", "salt_pepper"}
)  # fmt: skip

# `Field(discriminator="kind")` makes an unknown kind a clear error about `kind` rather than a
# list of every member's failures.
AnyJobSpec = AutoencoderSpec | StackedSpec | SemisupervisedSpec
JobSpec = Annotated[AnyJobSpec, Field(discriminator="kind")]
JOB_SPEC_ADAPTER: TypeAdapter[AnyJobSpec] = TypeAdapter(JobSpec)


def parse_job_spec(data: object) -> AnyJobSpec:
    """Validate a decoded JSON/YAML document as a JobSpec."""
    return JOB_SPEC_ADAPTER.validate_python(data)

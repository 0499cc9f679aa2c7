"""The job spec: what a user asks aetrain to train. Every number has a bound.

A spec is frozen and forbids unknown keys, so a typo is a 422 that names the field.
`JobSpec` is a union discriminated by `kind`.

A field that the rest of the spec makes pointless is never dropped in silence: where that is
clearly a mistake the spec is refused naming the field (a dense `activation` with no hidden
layers, `n_samples` on a dataset of fixed size), else `warnings()` says so on the job record.
Both look at values, not at which keys were written: a stored spec is dumped whole and parsed
again (by the API for uploads, by the workers, from Redis), and must mean the same each time.
The field descriptions here are docs/spec.md's reference (`python -m shared.spec_schema`).
"""

import math
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    JsonValue,
    Tag,
    TypeAdapter,
    field_validator,
    model_validator,
)

from shared.datasets import DATASET_ID, UploadedData

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
MAX_PARAMETERS = 50_000_000
N_SAMPLES_DEFAULT = 2000
CHECKPOINT_EVERY_DEFAULT = 5

Activation = Literal["relu", "sigmoid", "tanh", "gelu", "linear"]
HIDDEN_ACTIVATION_DEFAULT: Activation = "relu"
Width = Annotated[int, Field(ge=1, le=8192)]


# _known_dataset's rule as a JSON schema can say it, so editors complete names and flag typos.
_BUILTIN_NAMES: list[JsonValue] = [*sorted(BUILTIN_DATASETS)]
DATASET_SCHEMA: dict[str, JsonValue] = {
    "anyOf": [
        {"type": "string", "enum": _BUILTIN_NAMES},
        {"type": "string", "pattern": DATASET_ID.pattern},
    ]
}


class FrozenSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


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
    normalize: Literal["minmax", "standard", "none"] = Field(
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


CODE_ACTIVATION_DESCRIPTION = (
    "activation of the code layer (sigmoid for codes in (0, 1), which kl sparsity needs)"
)


class DenseModelSpec(FrozenSpec):
    """`model` with `arch: dense` (the default): fully connected layers, mirrored."""

    arch: Literal["dense"] = Field(default="dense", description="dense, or conv (below)")
    hidden: tuple[Width, ...] = Field(
        default=(), max_length=8,
        description="sizes of the encoder's hidden layers, input side first; the decoder "
        "mirrors them. Empty: one layer from the input to the code",
    )  # fmt: skip
    latent_dim: Width = Field(
        description="size of the code: below the input size is undercomplete, above overcomplete"
    )
    activation: Activation = Field(
        default=HIDDEN_ACTIVATION_DEFAULT,
        description="activation of the hidden layers (encoder and decoder); linear throughout "
        "is the PCA-equivalent autoencoder. With no hidden layers there is none to apply it to",
    )
    code_activation: Activation = Field(default="linear", description=CODE_ACTIVATION_DESCRIPTION)
    tied: bool = Field(default=False, description="decoder weights are the encoder's, transposed")

    @model_validator(mode="before")
    @classmethod
    def _no_conv_fields(cls, data: object) -> object:
        return refuse_other_arch(data, cls, ConvModelSpec, "conv")

    @property
    def is_one_sigmoid_layer(self) -> bool:
        """Input to sigmoid code in one layer: its contraction has an exact closed form."""
        return not self.hidden and self.code_activation == "sigmoid"

    def parameter_count(self, input_dim: int) -> int:
        sizes = [input_dim, *self.hidden, self.latent_dim]
        weights = sum(a * b for a, b in zip(sizes, sizes[1:], strict=False))
        biases = sum(sizes[1:]) + sum(sizes[:-1])
        return biases + weights * (1 if self.tied else 2)


class ConvModelSpec(FrozenSpec):
    """`model` with `arch: conv`, for image datasets: convolutions, mirrored by transposed ones
    whose output padding is computed so that the output shape equals the input shape."""

    arch: Literal["conv"] = Field(description="conv: needs image-shaped data (C, H, W)")
    channels: tuple[Annotated[int, Field(ge=1, le=1024)], ...] = Field(
        default=(16, 32), min_length=1, max_length=6,
        description="output channels of each conv layer, input side first",
    )  # fmt: skip
    kernel_size: int = Field(
        default=3, ge=1, le=11, description="square kernel of every layer; padding kernel_size // 2"
    )
    stride: int = Field(default=2, ge=1, le=4, description="stride of every layer")
    latent_dim: Width = Field(description="size of the code, a linear layer after the convs")
    activation: Activation = Field(
        default="relu", description="activation after every conv and transposed conv"
    )
    code_activation: Activation = Field(default="linear", description=CODE_ACTIVATION_DESCRIPTION)

    @model_validator(mode="before")
    @classmethod
    def _no_dense_fields(cls, data: object) -> object:
        return refuse_other_arch(data, cls, DenseModelSpec, "dense")

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


def refuse_other_arch(
    data: object, own: type[BaseModel], other: type[BaseModel], other_arch: str
) -> object:
    """Names a field of the other architecture as such: `arch` defaults to dense, so
    `channels` without `arch: conv` would otherwise read as a mere unknown key."""
    if isinstance(data, dict):
        foreign = sorted(set(data) & (set(other.model_fields) - set(own.model_fields)))
        if foreign:
            raise ValueError(
                f"{foreign[0]}: a field of {other_arch} models, and this model is arch: "
                f"{data.get('arch', 'dense')}; set arch: {other_arch}, or leave {foreign[0]} out"
            )
    return data


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


PENALTY_OFF = "0 turns the penalty off (a warning on the job record)"


class KLSparsitySpec(FrozenSpec):
    """`objective.sparsity` with `type: kl`: `beta * sum_j KL(rho || rho_hat_j)`, with
    `rho_hat_j` the batch mean of code unit j. Needs `code_activation: sigmoid`."""

    type: Literal["kl"] = Field(description="which penalty")
    target: float = Field(
        default=0.05, gt=0.0, lt=1.0, description="rho: the mean activation each unit is pushed to"
    )
    weight: float = Field(default=1.0, ge=0.0, le=100.0, description=f"beta; {PENALTY_OFF}")


class L1SparsitySpec(FrozenSpec):
    """`objective.sparsity` with `type: l1`: `weight * sum_j |h_j|`, averaged over the batch."""

    type: Literal["l1"] = Field(description="which penalty")
    weight: float = Field(default=1e-3, ge=0.0, le=100.0, description=PENALTY_OFF)


class GaussianNoiseSpec(FrozenSpec):
    """`objective.denoising` with `type: gaussian`: `x + std * N(0, 1)`."""

    type: Literal["gaussian"] = Field(description="which noise")
    std: float = Field(
        default=0.2, gt=0.0, le=10.0, description="standard deviation, in normalized units"
    )


class MaskingNoiseSpec(FrozenSpec):
    """`objective.denoising` with `type: masking`: a random share of the inputs set to 0."""

    type: Literal["masking"] = Field(description="which noise")
    fraction: float = Field(default=0.25, gt=0.0, lt=1.0, description="share of values zeroed")


class SaltPepperNoiseSpec(FrozenSpec):
    """`objective.denoising` with `type: salt_pepper`: a random share of the inputs set to the
    batch's lowest or highest value, half and half."""

    type: Literal["salt_pepper"] = Field(description="which noise")
    fraction: float = Field(default=0.1, gt=0.0, lt=1.0, description="share of values replaced")


class ContractiveSpec(FrozenSpec):
    """`objective.contractive`: `lambda * ||J_f(x)||_F^2` of the encoder, exact for one sigmoid
    layer, else an unbiased estimate from random projections."""

    weight: float = Field(default=0.1, gt=0.0, le=100.0, description="lambda")
    projections: int = Field(
        default=1, ge=1, le=64,
        description="random projections of the estimate; one sigmoid layer (its exact form) "
        "uses none, and another value there is a warning",
    )  # fmt: skip


SparsitySpec = Annotated[KLSparsitySpec | L1SparsitySpec, Field(discriminator="type")]
DenoisingSpec = Annotated[
    GaussianNoiseSpec | MaskingNoiseSpec | SaltPepperNoiseSpec, Field(discriminator="type")
]


class ObjectiveSpec(FrozenSpec):
    """`objective`: the reconstruction loss and the regularizers added to it."""

    loss: Literal["mse", "bce"] = Field(
        default="mse",
        description="mse, or bce for inputs in [0, 1] (needs data.normalize: minmax; the "
        "decoder then ends in a sigmoid)",
    )
    sparsity: SparsitySpec | None = Field(default=None, description="a penalty on the code")
    denoising: DenoisingSpec | None = Field(
        default=None,
        description="corrupt the input, score the reconstruction against the clean one",
    )
    contractive: ContractiveSpec | None = Field(
        default=None, description="a penalty on the encoder's Jacobian"
    )

    @property
    def is_regularized(self) -> bool:
        return any((self.sparsity, self.denoising, self.contractive))


class TrainingSpec(FrozenSpec):
    """`training`: how long and how each stage's optimizer trains."""

    epochs: int = Field(default=30, ge=1, le=10_000, description="passes over the training split")
    batch_size: int = Field(
        default=128, ge=1, le=65_536, description="global: split over the DDP ranks"
    )
    optimizer: Literal["adam", "adamw", "sgd"] = Field(
        default="adam", description="adam, adamw, or sgd (momentum 0.9)"
    )
    lr: float = Field(default=1e-3, gt=0.0, le=10.0, description="learning rate")
    weight_decay: float = Field(
        default=0.0, ge=0.0, le=1.0, description="L2 penalty (adam, sgd); decoupled (adamw)"
    )
    seed: int = Field(
        default=0, ge=0, le=2**31 - 1,
        description="seed of the initial weights (a semisupervised job's come from data.seed), "
        "the batch order, and each rank's noise and projections (seed + rank)",
    )  # fmt: skip
    checkpoint_every: int = Field(
        default=CHECKPOINT_EVERY_DEFAULT, ge=1, le=10_000,
        description="epochs between checkpoints (the last epoch is always checkpointed); a "
        "restart resumes from the newest",
    )  # fmt: skip
    checkpoints_to_keep: int = Field(
        default=2, ge=1, le=100, description="how many of each stage's newest checkpoints are kept"
    )


class ResourcesSpec(FrozenSpec):
    """`resources`: the Ray Train worker group that runs a stage."""

    workers: int = Field(
        default=1, ge=1, le=64, description="DDP ranks (gloo on CPUs, NCCL on GPUs)"
    )
    gpus_per_worker: float = Field(
        default=0, ge=0, le=8, description="GPUs of each rank (a fraction shares one)"
    )
    cpus_per_worker: float = Field(default=1, gt=0, le=64, description="CPUs of each rank")
    max_failures: int = Field(
        default=0, ge=0, le=10,
        description="restarts of a stage's worker group after a failure or a stall",
    )  # fmt: skip
    progress_timeout_s: float = Field(
        default=600.0, ge=5.0, le=86_400.0,
        description="a stage that finishes no epoch for this long is stopped and retried",
    )  # fmt: skip


class JobSpecBase(FrozenSpec):
    name: str = Field(
        default="", max_length=100, pattern=r"^[A-Za-z0-9_.\- ]*$",
        description="a label for people: letters, digits, _ . - and spaces",
    )  # fmt: skip
    priority: int = Field(
        default=0, ge=0, le=9,
        description="a tenant's queued jobs start by priority (9 first), then age; at most "
        "what the API key allows",
    )  # fmt: skip
    tags: tuple[Annotated[str, Field(min_length=1, max_length=64)], ...] = Field(
        default=(), max_length=16, description="labels of your own, kept with the job"
    )
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, description="the worker group of each stage"
    )


class AutoencoderSpec(JobSpecBase):
    """A job with `kind: autoencoder`: one model trained to reconstruct its input."""

    kind: Literal["autoencoder"] = Field(description="which kind of job")
    data: DataSpec = Field(description="what to train on")
    model: ModelSpec = Field(description="dense (the default) or conv, chosen by `arch`")
    objective: ObjectiveSpec = Field(
        default_factory=ObjectiveSpec, description="loss and regularizers"
    )
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="the optimization")

    @model_validator(mode="after")
    def _fits_limits(self) -> "AutoencoderSpec":
        check_autoencoder(self.model, self.objective, self.data)
        return self

    def warnings(self) -> list[str]:
        """What is allowed but has no effect, or is probably not what the user wants."""
        return [
            *autoencoder_warnings(self.model, self.objective, self.data),
            *checkpoint_warnings(self.training, None),
        ]


def check_autoencoder(model: "DenseModelSpec | ConvModelSpec", objective: ObjectiveSpec,
                      data: DataSpec, where: str = "") -> None:  # fmt: skip
    """Checks across fields of one autoencoder; `where` prefixes the blamed field.

    A message blames a field the user wrote and says what to write instead.
    """
    code = model.code_activation
    if (
        isinstance(model, DenseModelSpec)
        and not model.hidden
        and model.activation not in (HIDDEN_ACTIVATION_DEFAULT, code)
    ):
        raise ValueError(
            f"{where}model.activation: {model.activation} would apply to hidden layers, and "
            f"{where}model.hidden is empty: the only activation in the encoder is the code "
            f"layer's, {where}model.code_activation ({code}). For a {model.activation} code, "
            f"write code_activation: {model.activation} instead"
        )
    if objective.loss == "bce" and data.normalize != "minmax":
        raise ValueError(
            f"{where}objective.loss: bce needs inputs in [0, 1]; set data.normalize to minmax"
        )
    if isinstance(objective.sparsity, KLSparsitySpec) and code != "sigmoid":
        # Named plainly: model.activation is the one users reach for, and it is not the code's.
        raise ValueError(
            f"{where}objective.sparsity: kl pushes each code unit's mean activation towards a "
            f"target in (0, 1), so it needs a sigmoid code; this model's code is {code} "
            f"({where}model.code_activation, linear unless set; model.activation applies to "
            f"hidden layers only): add code_activation: sigmoid to {where}model"
        )
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


def autoencoder_warnings(model: "DenseModelSpec | ConvModelSpec", objective: ObjectiveSpec,
                         data: DataSpec, where: str = "") -> list[str]:  # fmt: skip
    notes = objective_warnings(
        objective, isinstance(model, DenseModelSpec) and model.is_one_sigmoid_layer, where
    )
    if data.resolved and model.latent_dim > data.input_dim and not objective.is_regularized:
        notes.append(
            f"{where}model.latent_dim: {model.latent_dim} is above the input size "
            f"{data.input_dim} (overcomplete) with no sparsity, denoising or contractive term; "
            "the model can learn the identity"
        )
    return notes


def objective_warnings(objective: ObjectiveSpec, one_sigmoid_layer: bool, where: str) -> list[str]:
    """Parts of an objective that cannot change what is trained; `where` prefixes the field."""
    notes = []
    if objective.sparsity is not None and objective.sparsity.weight == 0:
        notes.append(
            f"{where}objective.sparsity.weight: 0 turns the {objective.sparsity.type} penalty "
            "off; give it a weight, or leave objective.sparsity out"
        )
    contractive = objective.contractive
    if contractive is not None and one_sigmoid_layer and contractive.projections != 1:
        notes.append(
            f"{where}objective.contractive.projections: {contractive.projections} has no "
            "effect: the contraction of one sigmoid layer is computed exactly (closed form), "
            "with no random projections"
        )
    return notes


def checkpoint_warnings(
    training: TrainingSpec, finetune: "FinetuneSpec | None", where: str = ""
) -> list[str]:
    """checkpoint_every that writes no checkpoint before the last epoch of any stage."""
    every, epochs = training.checkpoint_every, training.epochs
    if finetune is not None:
        epochs = max(epochs, finetune.epochs)
    if every == CHECKPOINT_EVERY_DEFAULT or every < epochs:
        return []
    return [
        f"{where}training.checkpoint_every: {every} is not below the {epochs} epochs of the "
        "longest stage, so only the last epoch is checkpointed (as it always is): a restart "
        "starts the stage over"
    ]


class LayerSpec(FrozenSpec):
    """An item of `layers`: one layer of a stack, trained as a one-layer autoencoder of its
    input (the data for the first, the codes of the frozen layers below for the others)."""

    units: Width = Field(description="code size of the layer")
    activation: Activation = Field(
        default="sigmoid", description="activation of the layer's code (it has no hidden layers)"
    )
    objective: ObjectiveSpec = Field(
        default_factory=ObjectiveSpec, description="the layer's own loss and regularizers"
    )

    def as_model(self) -> DenseModelSpec:
        return DenseModelSpec(latent_dim=self.units, code_activation=self.activation)


class FinetuneSpec(FrozenSpec):
    """`finetune`: a last stage that trains the whole stack end to end, on plain
    reconstruction (the layers' regularizers are not used; the loss is the first layer's)."""

    epochs: int = Field(default=20, ge=1, le=10_000, description="epochs of the stage")
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
            raise ValueError(f"{field}objective.sparsity: kl needs a sigmoid code, and this "
                             f"layer's is {layer.activation}: set {field}activation to "
                             "sigmoid")  # fmt: skip


def stack_warnings(layers: tuple[LayerSpec, ...], where: str = "") -> list[str]:
    return [
        note
        for i, layer in enumerate(layers)
        for note in objective_warnings(
            layer.objective, layer.as_model().is_one_sigmoid_layer, f"{where}layers.{i}."
        )
    ]


class StackedSpec(JobSpecBase):
    """A job with `kind: stacked`: greedy layer-wise pretraining, one stage per layer, then an
    optional fine-tuning stage."""

    kind: Literal["stacked"] = Field(description="which kind of job")
    data: DataSpec = Field(description="what to train on")
    layers: tuple[LayerSpec, ...] = Field(
        min_length=1, max_length=8, description="the layers, input side first"
    )
    finetune: FinetuneSpec | None = Field(default=None, description="no fine-tuning when left out")
    training: TrainingSpec = Field(
        default_factory=TrainingSpec,
        description="every stage's (the finetune stage takes its epochs and lr from finetune)",
    )
    baseline: bool = Field(
        default=True,
        description="also train the same deep shape from scratch (random weights, end to end, "
        "as many epochs as all the other stages together, finetune's lr), as a stage of its "
        "own, so the result says whether pretraining helped",
    )

    @model_validator(mode="after")
    def _layers_fit(self) -> "StackedSpec":
        check_stack(self.layers, self.data)
        return self

    def warnings(self) -> list[str]:
        """What is allowed but has no effect, or is probably not what the user wants."""
        return [*stack_warnings(self.layers), *checkpoint_warnings(self.training, self.finetune)]

    @property
    def scratch_epochs(self) -> int:
        """Epochs of the baseline: those of every other stage together, so that it never has
        less training than the pipeline it is compared with."""
        finetune = self.finetune.epochs if self.finetune else 0
        return len(self.layers) * self.training.epochs + finetune

    @property
    def scratch_lr(self) -> float:
        return (self.finetune.lr if self.finetune else None) or self.training.lr


HeadMethod = Literal["mlp", "joint", "label_spreading"]
RECONSTRUCTION_WEIGHT_DEFAULT = 1.0
NEIGHBORS_DEFAULT = 10
# Zhou et al. (2004) spread with alpha 0.99: labels travel far along the graph.
ALPHA_DEFAULT = 0.99
MIN_CONFIDENCE_DEFAULT = 0.0
# What each method reads beyond the MLP's fields; the others refuse them (a 422 naming them).
METHOD_FIELDS: dict[str, tuple[str, ...]] = {
    "mlp": (),
    "joint": ("reconstruction_weight",),
    "label_spreading": ("neighbors", "alpha", "min_confidence"),
}


class HeadSpec(FrozenSpec):
    """`head`: the classifier on the pretrained encoder's codes (and of the baseline, on raw
    inputs), trained with adam and checkpointed every quarter of its epochs. `method` says how
    the unlabeled inputs are used beyond the pretraining."""

    method: HeadMethod = Field(
        default="mlp",
        description="mlp: the head on the labeled subset only; joint: encoder, decoder and head "
        "trained together on the reconstruction of every training input plus the "
        "classification of the labeled ones; label_spreading: labels spread over a k-NN graph "
        "of the codes of every training input, then the head trained on all of them",
    )
    hidden: tuple[Width, ...] = Field(
        default=(64,), max_length=4,
        description="hidden layer sizes (ReLU); empty: a linear classifier",
    )  # fmt: skip
    epochs: int = Field(default=100, ge=1, le=10_000, description="epochs of the head's stage")
    lr: float = Field(default=3e-3, gt=0.0, le=10.0, description="learning rate")
    batch_size: int = Field(default=64, ge=1, le=65_536, description="global batch size")
    reconstruction_weight: float | None = Field(
        default=None, gt=0.0, le=100.0,
        description="joint only: loss = cross-entropy of the labeled + this weight times the "
        f"reconstruction loss of all inputs; default {RECONSTRUCTION_WEIGHT_DEFAULT}",
    )  # fmt: skip
    neighbors: int | None = Field(
        default=None, ge=1, le=100,
        description=f"label_spreading only: k of the k-NN graph; default {NEIGHBORS_DEFAULT}",
    )  # fmt: skip
    alpha: float | None = Field(
        default=None, gt=0.0, lt=1.0,
        description="label_spreading only: how far labels spread (0: not at all; near 1: "
        f"along the whole graph); default {ALPHA_DEFAULT}",
    )  # fmt: skip
    min_confidence: float | None = Field(
        default=None, ge=0.0, lt=1.0,
        description="label_spreading only: a spread label whose share of its point's score is "
        f"below this is dropped (pseudo-labels by confidence); default {MIN_CONFIDENCE_DEFAULT}",
    )  # fmt: skip

    @model_validator(mode="after")
    def _fields_of_the_method(self) -> "HeadSpec":
        for method, fields in METHOD_FIELDS.items():
            for name in fields:
                if method != self.method and getattr(self, name) is not None:
                    raise ValueError(f"{name}: a setting of method {method}, and this head's "
                                     f"method is {self.method}; set method: {method}, or leave "
                                     f"{name} out")  # fmt: skip
        return self

    @property
    def joint_weight(self) -> float:
        """The joint loss's weight of reconstruction."""
        return self.reconstruction_weight or RECONSTRUCTION_WEIGHT_DEFAULT

    @property
    def graph_neighbors(self) -> int:
        return self.neighbors or NEIGHBORS_DEFAULT

    @property
    def spread_alpha(self) -> float:
        return self.alpha or ALPHA_DEFAULT

    @property
    def kept_confidence(self) -> float:
        return self.min_confidence or MIN_CONFIDENCE_DEFAULT


class PretrainAutoencoderSpec(FrozenSpec):
    """`pretrain` with `kind: autoencoder`: an autoencoder job's sections but data and the
    job-wide fields; trained on every training input, labeled or not."""

    kind: Literal["autoencoder"] = Field(description="which kind of pretraining")
    model: ModelSpec = Field(description="dense (the default) or conv, chosen by `arch`")
    objective: ObjectiveSpec = Field(
        default_factory=ObjectiveSpec, description="loss and regularizers"
    )
    training: TrainingSpec = Field(
        default_factory=TrainingSpec,
        description="the optimization (its checkpoints_to_keep applies to every stage)",
    )
    resources: ResourcesSpec | None = Field(default=None, description="default: the job's")


class PretrainStackedSpec(FrozenSpec):
    """`pretrain` with `kind: stacked`: a stacked job's sections but data and the job-wide
    fields."""

    kind: Literal["stacked"] = Field(description="which kind of pretraining")
    layers: tuple[LayerSpec, ...] = Field(
        min_length=1, max_length=8, description="the layers, input side first"
    )
    finetune: FinetuneSpec | None = Field(default=None, description="no fine-tuning when left out")
    training: TrainingSpec = Field(
        default_factory=TrainingSpec,
        description="every pretraining stage's (its checkpoints_to_keep applies to every stage)",
    )
    resources: ResourcesSpec | None = Field(default=None, description="default: the job's")


PretrainSpec = Annotated[PretrainAutoencoderSpec | PretrainStackedSpec, Field(discriminator="kind")]


class SemisupervisedSpec(JobSpecBase):
    """A job with `kind: semisupervised`: pretrain an encoder on every input, train a classifier
    head on a labeled subset, and (by default) the same head on raw inputs as a baseline."""

    kind: Literal["semisupervised"] = Field(description="which kind of job")
    data: DataSpec = Field(description="a dataset with labels")
    labeled_fraction: float | None = Field(
        default=None, gt=0.0, le=1.0,
        description="share of the training split whose labels are used (or labeled_count)",
    )  # fmt: skip
    labeled_count: int | None = Field(
        default=None, ge=1, le=1_000_000,
        description="how many training labels are used, stratified and seeded "
        "(or labeled_fraction)",
    )  # fmt: skip
    test_fraction: float = Field(
        default=0.2, gt=0.0, le=0.5,
        description="share held out first, to test the head and the baseline on",
    )  # fmt: skip
    pretrain: PretrainSpec = Field(description="the encoder's training, chosen by `kind`")
    head: HeadSpec = Field(default_factory=HeadSpec, description="the classifier")
    finetune_encoder: bool = Field(
        default=False, description="true: the head's training also updates the encoder"
    )
    baseline: bool = Field(
        default=True, description="also train the head on raw inputs, as a stage of its own"
    )

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
        if self.head.method == "label_spreading" and self.data.resolved:
            points, neighbors = self.training_rows(), self.head.graph_neighbors
            if neighbors >= points:
                raise ValueError(f"head.neighbors: {neighbors} neighbors need more than the "
                                 f"{points} training inputs of this dataset")  # fmt: skip
        return self

    def training_rows(self) -> int:
        """Inputs in the training split (what test and validation leave), about: the splits
        round their sizes up."""
        rows = self.data.upload.rows if self.data.upload else BUILTIN_ROWS[self.data.dataset]
        return int(rows * (1 - self.test_fraction) * (1 - self.data.validation_fraction))

    def warnings(self) -> list[str]:
        """What is allowed but has no effect, or is probably not what the user wants."""
        pretrain = self.pretrain
        if isinstance(pretrain, PretrainAutoencoderSpec):
            notes = autoencoder_warnings(pretrain.model, pretrain.objective, self.data, "pretrain.")
            notes += checkpoint_warnings(pretrain.training, None, "pretrain.")
        else:
            notes = [
                *stack_warnings(pretrain.layers, "pretrain."),
                *checkpoint_warnings(pretrain.training, pretrain.finetune, "pretrain."),
            ]
        if self.head.method == "joint" and self.finetune_encoder:
            notes.append("finetune_encoder: true has no effect with head.method joint, which "
                         "always trains the encoder (on both losses)")  # fmt: skip
        return notes


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

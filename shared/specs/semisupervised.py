"""`kind: semisupervised`: SemisupervisedSpec, its classifier head, its pretraining variants."""

from typing import Annotated, Literal

from pydantic import Field, model_validator
from typing_extensions import TypeAliasType

from shared.specs.autoencoder import autoencoder_warnings, check_autoencoder
from shared.specs.base import FrozenSpec
from shared.specs.data import BUILTIN_ROWS, LABELED_DATASETS, DataSpec
from shared.specs.models import ModelSpec, Width
from shared.specs.objectives import ObjectiveSpec
from shared.specs.stacked import FinetuneSpec, LayerSpec, check_stack, stack_warnings
from shared.specs.training import JobSpecBase, ResourcesSpec, TrainingSpec, checkpoint_warnings

HeadMethod = TypeAliasType("HeadMethod", Literal["mlp", "joint", "label_spreading"])
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

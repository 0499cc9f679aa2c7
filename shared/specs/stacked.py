"""`kind: stacked`: StackedSpec, its layers and finetune stage, a stack's checks and warnings."""

from typing import Literal

from pydantic import Field, model_validator

from shared.specs.base import FrozenSpec
from shared.specs.data import DataSpec
from shared.specs.models import MAX_PARAMETERS, Activation, DenseModelSpec, Width
from shared.specs.objectives import KLSparsitySpec, ObjectiveSpec, objective_warnings
from shared.specs.training import JobSpecBase, TrainingSpec, checkpoint_warnings


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

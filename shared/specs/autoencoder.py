"""`kind: autoencoder`: AutoencoderSpec, and the checks and warnings of one autoencoder."""

from typing import Literal

from pydantic import Field, model_validator

from shared.specs.data import DataSpec
from shared.specs.models import (
    HIDDEN_ACTIVATION_DEFAULT,
    MAX_PARAMETERS,
    ConvModelSpec,
    DenseModelSpec,
    ModelSpec,
)
from shared.specs.objectives import KLSparsitySpec, ObjectiveSpec, objective_warnings
from shared.specs.training import JobSpecBase, TrainingSpec, checkpoint_warnings


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

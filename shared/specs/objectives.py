"""`objective`: the loss, its regularizers (sparsity, noise, contractive) and their warnings."""

from typing import Annotated, Literal

from pydantic import Field
from typing_extensions import TypeAliasType

from shared.specs.base import FrozenSpec

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


Loss = TypeAliasType("Loss", Literal["mse", "bce"])


class ObjectiveSpec(FrozenSpec):
    """`objective`: the reconstruction loss and the regularizers added to it."""

    loss: Loss = Field(
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

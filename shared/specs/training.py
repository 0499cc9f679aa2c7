"""`training`, `resources`: how a stage trains and runs; JobSpecBase: what every job kind has."""

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field
from typing_extensions import TypeAliasType

from shared.specs.base import FrozenSpec

if TYPE_CHECKING:
    from shared.specs.stacked import FinetuneSpec

CHECKPOINT_EVERY_DEFAULT = 5
Optimizer = TypeAliasType("Optimizer", Literal["adam", "adamw", "sgd"])


class TrainingSpec(FrozenSpec):
    """`training`: how long and how each stage's optimizer trains."""

    epochs: int = Field(default=30, ge=1, le=10_000, description="passes over the training split")
    batch_size: int = Field(
        default=128, ge=1, le=65_536, description="global: split over the DDP ranks"
    )
    optimizer: Optimizer = Field(default="adam", description="adam, adamw, or sgd (momentum 0.9)")
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

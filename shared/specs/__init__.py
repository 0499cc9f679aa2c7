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

from typing import Annotated

from pydantic import Field, TypeAdapter

from shared.specs.autoencoder import AutoencoderSpec, autoencoder_warnings, check_autoencoder
from shared.specs.base import FrozenSpec
from shared.specs.data import (
    BUILTIN_DATASETS,
    BUILTIN_ROWS,
    DATASET_SCHEMA,
    GENERATED_DATASETS,
    LABELED_DATASETS,
    N_SAMPLES_DEFAULT,
    DataSpec,
)
from shared.specs.models import (
    CODE_ACTIVATION_DESCRIPTION,
    HIDDEN_ACTIVATION_DEFAULT,
    MAX_PARAMETERS,
    Activation,
    ConvModelSpec,
    DenseModelSpec,
    ModelSpec,
    Width,
    conv_out,
    refuse_other_arch,
    transposed_out,
)
from shared.specs.objectives import (
    PENALTY_OFF,
    ContractiveSpec,
    DenoisingSpec,
    GaussianNoiseSpec,
    KLSparsitySpec,
    L1SparsitySpec,
    MaskingNoiseSpec,
    ObjectiveSpec,
    SaltPepperNoiseSpec,
    SparsitySpec,
    objective_warnings,
)
from shared.specs.semisupervised import (
    ALPHA_DEFAULT,
    METHOD_FIELDS,
    MIN_CONFIDENCE_DEFAULT,
    NEIGHBORS_DEFAULT,
    RECONSTRUCTION_WEIGHT_DEFAULT,
    HeadMethod,
    HeadSpec,
    PretrainAutoencoderSpec,
    PretrainSpec,
    PretrainStackedSpec,
    SemisupervisedSpec,
)
from shared.specs.stacked import (
    FinetuneSpec,
    LayerSpec,
    StackedSpec,
    check_stack,
    stack_warnings,
)
from shared.specs.training import (
    CHECKPOINT_EVERY_DEFAULT,
    JobSpecBase,
    ResourcesSpec,
    TrainingSpec,
    checkpoint_warnings,
)

__all__ = [
    "ALPHA_DEFAULT",
    "Activation",
    "AnyJobSpec",
    "AutoencoderSpec",
    "BUILTIN_DATASETS",
    "BUILTIN_ROWS",
    "CHECKPOINT_EVERY_DEFAULT",
    "CODE_ACTIVATION_DESCRIPTION",
    "ContractiveSpec",
    "ConvModelSpec",
    "DATASET_SCHEMA",
    "DataSpec",
    "DenoisingSpec",
    "DenseModelSpec",
    "FinetuneSpec",
    "FrozenSpec",
    "GENERATED_DATASETS",
    "GaussianNoiseSpec",
    "HIDDEN_ACTIVATION_DEFAULT",
    "HeadMethod",
    "HeadSpec",
    "JOB_SPEC_ADAPTER",
    "JobSpec",
    "JobSpecBase",
    "KLSparsitySpec",
    "L1SparsitySpec",
    "LABELED_DATASETS",
    "LayerSpec",
    "MAX_PARAMETERS",
    "METHOD_FIELDS",
    "MIN_CONFIDENCE_DEFAULT",
    "MaskingNoiseSpec",
    "ModelSpec",
    "NEIGHBORS_DEFAULT",
    "N_SAMPLES_DEFAULT",
    "ObjectiveSpec",
    "PENALTY_OFF",
    "PretrainAutoencoderSpec",
    "PretrainSpec",
    "PretrainStackedSpec",
    "RECONSTRUCTION_WEIGHT_DEFAULT",
    "ResourcesSpec",
    "SaltPepperNoiseSpec",
    "SemisupervisedSpec",
    "SparsitySpec",
    "StackedSpec",
    "TrainingSpec",
    "UNION_TAGS",
    "Width",
    "autoencoder_warnings",
    "check_autoencoder",
    "check_stack",
    "checkpoint_warnings",
    "conv_out",
    "objective_warnings",
    "parse_job_spec",
    "refuse_other_arch",
    "stack_warnings",
    "transposed_out",
]

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

"""The plan of a job: its stages, what each needs first, and the resources each asks for.

autoencoder      train
stacked          layer1 -> layer2 -> ... -> layerN [-> finetune]
semisupervised   pretrain (or pretrain-layer1 -> ... [-> pretrain-finetune]) -> head
                 baseline (needs nothing: it runs beside the pretraining)
"""

from dataclasses import dataclass
from typing import Literal

from shared.specs import (
    AnyJobSpec,
    AutoencoderSpec,
    PretrainAutoencoderSpec,
    ResourcesSpec,
    StackedSpec,
)

StageKind = Literal["autoencoder", "layer", "finetune", "head", "baseline"]


@dataclass(frozen=True)
class StagePlan:
    name: str
    kind: StageKind
    needs: tuple[str, ...]
    resources: ResourcesSpec
    layer: int | None = None  # index into the layers of a stack


def plan_stages(spec: AnyJobSpec) -> list[StagePlan]:
    """Every stage of a job, in an order where each stage comes after what it needs."""
    if isinstance(spec, AutoencoderSpec):
        return [StagePlan("train", "autoencoder", (), spec.resources)]
    if isinstance(spec, StackedSpec):
        return _stack_plan("", len(spec.layers), spec.finetune is not None, spec.resources)
    pretrain = spec.pretrain
    resources = pretrain.resources or spec.resources
    if isinstance(pretrain, PretrainAutoencoderSpec):
        stages = [StagePlan("pretrain", "autoencoder", (), resources)]
    else:
        has_finetune = pretrain.finetune is not None
        stages = _stack_plan("pretrain-", len(pretrain.layers), has_finetune, resources)
    stages.append(StagePlan("head", "head", (stages[-1].name,), spec.resources))
    if spec.baseline:
        stages.append(StagePlan("baseline", "baseline", (), spec.resources))
    return stages


def _stack_plan(
    prefix: str, layers: int, finetune: bool, resources: ResourcesSpec
) -> list[StagePlan]:
    stages: list[StagePlan] = []
    for i in range(layers):
        needs = (stages[-1].name,) if stages else ()
        stages.append(StagePlan(f"{prefix}layer{i + 1}", "layer", needs, resources, layer=i))
    if finetune:
        stages.append(StagePlan(f"{prefix}finetune", "finetune", (stages[-1].name,), resources))
    return stages

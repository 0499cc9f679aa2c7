"""The plan of a job: its stages, what each needs first, and the resources each asks for.

autoencoder      train
stacked          layer1 -> layer2 -> ... -> layerN [-> finetune]
                 [baseline: the same stack from scratch, beside the others]
semisupervised   pretrain (or pretrain-layer1 -> ... [-> pretrain-finetune]) -> head
                 baseline (needs nothing: it runs beside the pretraining)
"""

from dataclasses import dataclass
from typing import Literal

from shared.specs import (
    AnyJobSpec,
    AutoencoderSpec,
    PretrainAutoencoderSpec,
    PretrainStackedSpec,
    ResourcesSpec,
    StackedSpec,
)

StageKind = Literal["autoencoder", "layer", "finetune", "head", "baseline", "scratch"]


@dataclass(frozen=True)
class StagePlan:
    name: str
    kind: StageKind
    needs: tuple[str, ...]
    resources: ResourcesSpec
    epochs: int
    layer: int | None = None  # index into the layers of a stack

    @property
    def demand(self) -> dict[str, float]:
        """What the stage's worker group takes from the cluster."""
        need = {"CPU": self.resources.workers * self.resources.cpus_per_worker}
        if self.resources.gpus_per_worker:
            need["GPU"] = self.resources.workers * self.resources.gpus_per_worker
        return need


def plan_stages(spec: AnyJobSpec) -> list[StagePlan]:
    """Every stage of a job, in an order where each stage comes after what it needs."""
    if isinstance(spec, AutoencoderSpec):
        return [StagePlan("train", "autoencoder", (), spec.resources, spec.training.epochs)]
    if isinstance(spec, StackedSpec):
        stages = _stack_plan("", spec, spec.resources)
        if spec.baseline:
            stages.append(StagePlan("baseline", "scratch", (), spec.resources, spec.scratch_epochs))
        return stages
    pretrain = spec.pretrain
    resources = pretrain.resources or spec.resources
    if isinstance(pretrain, PretrainAutoencoderSpec):
        stages = [StagePlan("pretrain", "autoencoder", (), resources, pretrain.training.epochs)]
    else:
        stages = _stack_plan("pretrain-", pretrain, resources)
    head_epochs = spec.head.epochs
    stages.append(StagePlan("head", "head", (stages[-1].name,), spec.resources, head_epochs))
    if spec.baseline:
        stages.append(StagePlan("baseline", "baseline", (), spec.resources, head_epochs))
    return stages


def _stack_plan(
    prefix: str, stack: StackedSpec | PretrainStackedSpec, resources: ResourcesSpec
) -> list[StagePlan]:
    stages: list[StagePlan] = []
    epochs = stack.training.epochs
    for i in range(len(stack.layers)):
        needs = (stages[-1].name,) if stages else ()
        stages.append(StagePlan(f"{prefix}layer{i + 1}", "layer", needs, resources, epochs, i))
    if stack.finetune is not None:
        needs = (stages[-1].name,)
        finetune = StagePlan(f"{prefix}finetune", "finetune", needs, resources,
                             stack.finetune.epochs)  # fmt: skip
        stages.append(finetune)
    return stages

"""What each kind of stage trains: its model, data, loss and evaluation.

The train loop (train_loop.py) is the same for every stage; a Task is what differs:
    autoencoder   a model of the spec on the data
    layer k       a one-layer autoencoder on the codes of the frozen layers 1..k-1
    finetune      the whole stack, end to end, from the layers' weights
    head          a classifier on the pretrained encoder's codes, on the labeled subset
    baseline      the same classifier on raw inputs, on the same labeled subset
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from shared.specs import (
    AnyJobSpec,
    AutoencoderSpec,
    ObjectiveSpec,
    PretrainAutoencoderSpec,
    SemisupervisedSpec,
    StackedSpec,
    TrainingSpec,
)
from shared.stages import StagePlan, plan_stages
from workers.checkpoints import load_state
from workers.classifier import Classifier, accuracy, freeze
from workers.data import Split, build_datasets, labeled_subset
from workers.models import Autoencoder, build_model
from workers.objectives import compute_loss, evaluate_reconstruction
from workers.stack import build_stack, encode_through, layer_model

Batch = list[torch.Tensor]


@dataclass
class Task:
    model: nn.Module
    arrays: tuple[np.ndarray, ...]  # the training data: (x,) or (x, y)
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    evaluate: Callable[[nn.Module], dict[str, float]]  # per epoch, on rank 0
    final: Callable[[nn.Module], dict[str, float]]  # once, on the finished model
    training: TrainingSpec


class OnDevice:
    """A tensor copied once to the device of the model that evaluates on it (a GPU rank's
    model is on the GPU; the data is built on the CPU)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._copies = {tensor.device: tensor}
        self._source = tensor

    @staticmethod
    def device_of(model: nn.Module) -> torch.device:
        return next(model.parameters()).device

    def like(self, model: nn.Module) -> torch.Tensor:
        device = self.device_of(model)
        if device not in self._copies:
            self._copies[device] = self._source.to(device)
        return self._copies[device]


def init_seed(spec: AnyJobSpec) -> int:
    """The seed of a job's initial weights (the same on every rank)."""
    if isinstance(spec, SemisupervisedSpec):
        return spec.data.seed
    return spec.training.seed


def head_training(spec: SemisupervisedSpec) -> TrainingSpec:
    return TrainingSpec(
        epochs=spec.head.epochs,
        batch_size=spec.head.batch_size,
        lr=spec.head.lr,
        seed=spec.data.seed,
        checkpoint_every=max(1, spec.head.epochs // 4),
    )


def checkpoints_to_keep(spec: AnyJobSpec) -> int:
    if isinstance(spec, SemisupervisedSpec):
        return spec.pretrain.training.checkpoints_to_keep
    return spec.training.checkpoints_to_keep


def find_stage(spec: AnyJobSpec, name: str) -> StagePlan:
    for stage in plan_stages(spec):
        if stage.name == name:
            return stage
    raise ValueError(f"no stage {name!r} in a {spec.kind} job")


def lr_field(spec: AnyJobSpec, stage: StagePlan) -> str:
    """The spec field that sets the learning rate of `stage` (what to lower when it diverges)."""
    if stage.kind in ("head", "baseline"):
        return "head.lr"
    prefix = "pretrain." if isinstance(spec, SemisupervisedSpec) else ""
    return f"{prefix}finetune.lr" if stage.kind == "finetune" else f"{prefix}training.lr"


def job_split(spec: AnyJobSpec, datasets: Path | None) -> Split:
    test_fraction = spec.test_fraction if isinstance(spec, SemisupervisedSpec) else 0.0
    return build_datasets(spec.data, test_fraction, datasets)


def build_task(
    spec: AnyJobSpec, stage: StagePlan, inputs: dict[str, str], datasets: Path | None
) -> Task:
    """The task of `stage`; `inputs` maps finished stages to their checkpoints.

    `datasets` is the folder of uploaded datasets (only a job on an upload reads it).
    """
    split = job_split(spec, datasets)
    if stage.kind == "autoencoder":
        ae = spec if isinstance(spec, AutoencoderSpec) else _pretrain_autoencoder(spec)
        model = build_model(ae.model, spec.data.input_shape, ae.objective.loss)
        return _reconstruction_task(model, split.x_train, split.x_val, ae.objective, ae.training)
    if stage.kind in ("layer", "finetune"):
        return _stack_task(spec, stage, split, inputs)
    return _classifier_task(spec, stage, split, inputs)


def _pretrain_autoencoder(spec: AnyJobSpec) -> PretrainAutoencoderSpec:
    assert isinstance(spec, SemisupervisedSpec)
    assert isinstance(spec.pretrain, PretrainAutoencoderSpec)
    return spec.pretrain


def _reconstruction_task(
    model: nn.Module,
    x_train: np.ndarray,
    x_val: np.ndarray,
    objective: ObjectiveSpec,
    training: TrainingSpec,
) -> Task:
    x_val_t = OnDevice(torch.from_numpy(x_val))

    def evaluate(m: nn.Module) -> dict[str, float]:
        return evaluate_reconstruction(m, x_val_t.like(m), objective)

    return Task(
        model=model,
        arrays=(x_train,),
        loss=lambda m, batch: compute_loss(m, batch[0], objective),
        evaluate=evaluate,
        final=evaluate,
        training=training,
    )


def _stack_task(spec: AnyJobSpec, stage: StagePlan, split: Split, inputs: dict[str, str]) -> Task:
    stack_spec = spec if isinstance(spec, StackedSpec) else getattr(spec, "pretrain", None)
    assert stack_spec is not None and hasattr(stack_spec, "layers")
    layers, training = stack_spec.layers, stack_spec.training
    prefix = "pretrain-" if isinstance(spec, SemisupervisedSpec) else ""
    if stage.kind == "finetune":
        checkpoints = [inputs[f"{prefix}layer{i + 1}"] for i in range(len(layers))]
        stack = build_stack(layers, spec.data.input_dim, checkpoints)
        finetune = stack_spec.finetune
        assert finetune is not None
        tuned = training.model_copy(
            update={"epochs": finetune.epochs, "lr": finetune.lr or training.lr}
        )
        plain = ObjectiveSpec(loss=layers[0].objective.loss)
        return _reconstruction_task(stack, split.x_train, split.x_val, plain, tuned)
    k = stage.layer or 0
    frozen: list[nn.Module] = []
    if k:
        checkpoints = [inputs[f"{prefix}layer{i + 1}"] for i in range(k)]
        frozen = list(build_stack(layers[:k], spec.data.input_dim, checkpoints).encoder)
    x_train = encode_through(frozen, torch.from_numpy(split.x_train)).numpy()
    x_val = encode_through(frozen, torch.from_numpy(split.x_val)).numpy()
    model = layer_model(layers[k], x_train.shape[1])
    return _reconstruction_task(model, x_train, x_val, layers[k].objective, training)


def pretrained_encoder(spec: SemisupervisedSpec, inputs: dict[str, str]) -> tuple[nn.Module, int]:
    """The encoder the pretraining stages produced, and its code size."""
    pretrain = spec.pretrain
    if isinstance(pretrain, PretrainAutoencoderSpec):
        model: Autoencoder = build_model(
            pretrain.model, spec.data.input_shape, pretrain.objective.loss
        )
        model.load_state_dict(load_state(inputs["pretrain"])["model"])
        return model.encoder, pretrain.model.latent_dim
    layers = pretrain.layers
    if pretrain.finetune is not None:
        stack = build_stack(layers, spec.data.input_dim)
        stack.load_state_dict(load_state(inputs["pretrain-finetune"])["model"])
    else:
        checkpoints = [inputs[f"pretrain-layer{i + 1}"] for i in range(len(layers))]
        stack = build_stack(layers, spec.data.input_dim, checkpoints)
    return stack.encoder, layers[-1].units


def build_classifier(
    spec: SemisupervisedSpec, stage: StagePlan, inputs: dict[str, str], classes: int
) -> Classifier:
    if stage.kind == "baseline":
        return Classifier(nn.Identity(), spec.data.input_dim, spec.head.hidden, classes)
    encoder, code_dim = pretrained_encoder(spec, inputs)
    if not spec.finetune_encoder:
        freeze(encoder)
    return Classifier(encoder, code_dim, spec.head.hidden, classes)


def _classifier_task(
    spec: AnyJobSpec, stage: StagePlan, split: Split, inputs: dict[str, str]
) -> Task:
    assert isinstance(spec, SemisupervisedSpec)
    assert split.y_train is not None and split.y_val is not None and split.y_test is not None
    classes = int(max(split.y_train.max(), split.y_val.max(), split.y_test.max())) + 1
    chosen = labeled_subset(split.y_train, spec.labeled_fraction, spec.labeled_count,
                            spec.data.seed)  # fmt: skip
    model = build_classifier(spec, stage, inputs, classes)
    x_val, y_val = OnDevice(torch.from_numpy(split.x_val)), OnDevice(torch.from_numpy(split.y_val))
    x_test, y_test = torch.from_numpy(split.x_test), torch.from_numpy(split.y_test)
    training = head_training(spec)

    def evaluate(m: nn.Module) -> dict[str, float]:
        return {"val_accuracy": accuracy(m, x_val.like(m), y_val.like(m))}

    def final(m: nn.Module) -> dict[str, float]:
        device = OnDevice.device_of(m)
        return {
            **evaluate(m),
            "test_accuracy": accuracy(m, x_test.to(device), y_test.to(device)),
            "labeled": float(len(chosen)),
            "classes": float(classes),
        }

    return Task(
        model=model,
        arrays=(split.x_train[chosen], split.y_train[chosen]),
        loss=lambda m, batch: F.cross_entropy(m(batch[0]), batch[1]),
        evaluate=evaluate,
        final=final,
        training=training,
    )

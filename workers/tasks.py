"""What each kind of stage trains: its model, data, loss and evaluation.

The train loop (train_loop.py) is the same for every stage; a Task is what differs:
    autoencoder   a model of the spec on the data
    layer k       a one-layer autoencoder on the codes of the frozen layers 1..k-1
    finetune      the whole stack, end to end, from the layers' weights
    scratch       the same stack from random weights, end to end (a stacked job's baseline)
    head          a classifier on the pretrained encoder's codes, by the head's method:
                  mlp on the labeled subset; joint on it and the reconstruction of every
                  training input; label_spreading on every unlabeled input (unlabeled_pool),
                  labeled by spreading
A semi-supervised job's pretraining fits every input but the test split and the validation
samples it scores (pretraining_split): the labels are what is scarce, not the inputs.
    baseline      an MLP classifier on raw inputs, on the same labeled subset
"""

import dataclasses
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
from workers.classifier import (
    Classifier,
    JointClassifier,
    accuracy,
    freeze,
    joint_loss,
    pseudo_labels,
    scoring_model,
    spread_labels,
)
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
    if stage.kind == "scratch":
        assert isinstance(spec, StackedSpec)
        return "finetune.lr" if spec.finetune is not None else "training.lr"
    prefix = "pretrain." if isinstance(spec, SemisupervisedSpec) else ""
    return f"{prefix}finetune.lr" if stage.kind == "finetune" else f"{prefix}training.lr"


def job_split(spec: AnyJobSpec, datasets: str | Path | None) -> Split:
    test_fraction = spec.test_fraction if isinstance(spec, SemisupervisedSpec) else 0.0
    return build_datasets(spec.data, test_fraction, datasets)


def build_task(
    spec: AnyJobSpec, stage: StagePlan, inputs: dict[str, str], datasets: str | Path | None
) -> Task:
    """The task of `stage`; `inputs` maps finished stages to their checkpoints.

    `datasets` is the folder of uploaded datasets (only a job on an upload reads it).
    """
    split = job_split(spec, datasets)
    if isinstance(spec, SemisupervisedSpec) and stage.kind in ("autoencoder", "layer", "finetune"):
        split = pretraining_split(spec, split)
    if stage.kind == "autoencoder":
        ae = spec if isinstance(spec, AutoencoderSpec) else _pretrain_autoencoder(spec)
        model = build_model(ae.model, spec.data.input_shape, ae.objective.loss)
        return _reconstruction_task(model, split.x_train, split.x_val, ae.objective, ae.training)
    if stage.kind in ("layer", "finetune"):
        return _stack_task(spec, stage, split, inputs)
    if stage.kind == "scratch":
        return _scratch_task(spec, split)
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
    model = layer_model(layers[k], x_train.shape[1], layers[k - 1] if k else None)
    return _reconstruction_task(model, x_train, x_val, layers[k].objective, training)


def _scratch_task(spec: AnyJobSpec, split: Split) -> Task:
    assert isinstance(spec, StackedSpec)
    stack = build_stack(spec.layers, spec.data.input_dim)  # random weights (seeded)
    training = spec.training.model_copy(
        update={"epochs": spec.scratch_epochs, "lr": spec.scratch_lr}
    )
    plain = ObjectiveSpec(loss=spec.layers[0].objective.loss)  # as the finetune stage's
    return _reconstruction_task(stack, split.x_train, split.x_val, plain, training)


def pretrained_autoencoder(
    spec: SemisupervisedSpec, inputs: dict[str, str]
) -> tuple[Autoencoder, int]:
    """The autoencoder the pretraining stages produced, and its code size."""
    pretrain = spec.pretrain
    if isinstance(pretrain, PretrainAutoencoderSpec):
        model: Autoencoder = build_model(
            pretrain.model, spec.data.input_shape, pretrain.objective.loss
        )
        model.load_state_dict(load_state(inputs["pretrain"])["model"])
        return model, pretrain.model.latent_dim
    layers = pretrain.layers
    if pretrain.finetune is not None:
        stack = build_stack(layers, spec.data.input_dim)
        stack.load_state_dict(load_state(inputs["pretrain-finetune"])["model"])
    else:
        checkpoints = [inputs[f"pretrain-layer{i + 1}"] for i in range(len(layers))]
        stack = build_stack(layers, spec.data.input_dim, checkpoints)
    return stack, layers[-1].units


def pretrained_encoder(spec: SemisupervisedSpec, inputs: dict[str, str]) -> tuple[nn.Module, int]:
    """The encoder the pretraining stages produced, and its code size."""
    model, code_dim = pretrained_autoencoder(spec, inputs)
    return model.encoder, code_dim


def reconstruction_kind(spec: SemisupervisedSpec) -> str:
    """The pretraining's reconstruction loss (mse or bce), which a joint head goes on with."""
    pretrain = spec.pretrain
    if isinstance(pretrain, PretrainAutoencoderSpec):
        return pretrain.objective.loss
    return pretrain.layers[0].objective.loss


def build_classifier(
    spec: SemisupervisedSpec, stage: StagePlan, inputs: dict[str, str], classes: int
) -> Classifier | JointClassifier:
    """The model `stage` trains: a Classifier, or for a joint head a JointClassifier."""
    if stage.kind == "baseline":
        return Classifier(nn.Identity(), spec.data.input_dim, spec.head.hidden, classes)
    if spec.head.method == "joint":  # the encoder is trained: that is the method
        autoencoder, code_dim = pretrained_autoencoder(spec, inputs)
        classifier = Classifier(autoencoder.encoder, code_dim, spec.head.hidden, classes)
        return JointClassifier(classifier, autoencoder.decoder)
    encoder, code_dim = pretrained_encoder(spec, inputs)
    if not spec.finetune_encoder:
        freeze(encoder)
    return Classifier(encoder, code_dim, spec.head.hidden, classes)


def _classifier_task(
    spec: AnyJobSpec, stage: StagePlan, split: Split, inputs: dict[str, str]
) -> Task:
    assert isinstance(spec, SemisupervisedSpec)
    assert split.y_train is not None and split.y_val is not None and split.y_test is not None
    classes = label_classes(split)
    chosen = labeled_subset(split.y_train, spec.labeled_fraction, spec.labeled_count,
                            spec.data.seed)  # fmt: skip
    model = build_classifier(spec, stage, inputs, classes)
    pool, scored = unlabeled_pool(spec, split)
    x_val = OnDevice(torch.from_numpy(split.x_val[scored]))
    y_val = OnDevice(torch.from_numpy(split.y_val[scored]))
    x_test, y_test = torch.from_numpy(split.x_test), torch.from_numpy(split.y_test)
    training = head_training(spec)
    method = "mlp" if stage.kind == "baseline" else spec.head.method
    x_labeled, y_labeled = split.x_train[chosen], split.y_train[chosen]
    extra: dict[str, float] = {}
    arrays: tuple[np.ndarray, ...] = (x_labeled, y_labeled)
    loss = _cross_entropy
    if method == "joint":
        arrays = (split.x_train, *_tiled(x_labeled, y_labeled, len(split.x_train), spec.data.seed))
        loss = _joint(spec.head.joint_weight, reconstruction_kind(spec))
    elif method == "label_spreading":
        assert isinstance(model, Classifier)
        with torch.no_grad():  # the pool has the training split first: `chosen` indexes it
            codes = model.encoder(torch.from_numpy(pool)).numpy()
        # Standardized, so that no code dimension's scale alone decides who is a neighbor
        # (bench/label_spreading_offline.py).
        codes = (codes - codes.mean(axis=0)) / np.maximum(codes.std(axis=0), 1e-12)
        labels = np.full(len(pool), -1, dtype=np.int64)
        labels[chosen] = y_labeled
        head = spec.head
        scores = spread_labels(codes, labels, classes, head.graph_neighbors, head.spread_alpha)
        index, spread = pseudo_labels(scores, labels, head.kept_confidence)
        arrays = (pool[index], spread)
        extra["pseudo_labeled"] = float(len(index) - len(chosen))

    def evaluate(m: nn.Module) -> dict[str, float]:
        scorer = scoring_model(m)
        return {"val_accuracy": accuracy(scorer, x_val.like(m), y_val.like(m))}

    def final(m: nn.Module) -> dict[str, float]:
        device = OnDevice.device_of(m)
        scorer = scoring_model(m)
        return {
            **evaluate(m),
            "test_accuracy": accuracy(scorer, x_test.to(device), y_test.to(device)),
            "labeled": float(len(chosen)),
            "val_labeled": float(len(scored)),
            "classes": float(classes),
            **extra,
        }

    return Task(
        model=model, arrays=arrays, loss=loss, evaluate=evaluate, final=final, training=training
    )


def labeled_validation(
    spec: SemisupervisedSpec, y_train: np.ndarray, y_val: np.ndarray, classes: int
) -> np.ndarray:
    """The validation samples whose labels the job may read: the training labels' share of
    the validation split (at least one per class), so that choosing settings by val_accuracy
    needs no more labels than a user of the method would have, and never the test split."""
    share = len(labeled_subset(y_train, spec.labeled_fraction, spec.labeled_count,
                               spec.data.seed)) / len(y_train)  # fmt: skip
    count = min(len(y_val), max(classes, round(share * len(y_val))))
    return labeled_subset(y_val, None, count, spec.data.seed)


def label_classes(split: Split) -> int:
    """How many classes the job's labels have (every split's): the pretraining and the head
    must count alike, or they would hold out different validation samples."""
    labels = [y for y in (split.y_train, split.y_val, split.y_test) if y is not None]
    return int(max(y.max() for y in labels)) + 1


def unlabeled_pool(spec: SemisupervisedSpec, split: Split) -> tuple[np.ndarray, np.ndarray]:
    """The inputs a semi-supervised job learns from without their labels: the training split
    and the validation samples whose labels it never reads (the training split first, in its
    order); and the validation samples it scores, which nothing trains on, so that
    val_accuracy (and the pretraining's val_mse) are measured on inputs no stage has seen."""
    assert split.y_train is not None and split.y_val is not None
    scored = labeled_validation(spec, split.y_train, split.y_val, label_classes(split))
    unscored = np.setdiff1d(np.arange(len(split.y_val)), scored)
    return np.concatenate([split.x_train, split.x_val[unscored]]), scored


def pretraining_split(spec: SemisupervisedSpec, split: Split) -> Split:
    """The split a semi-supervised job's pretraining sees: every unlabeled input to fit (all
    data but the test split and the scored validation samples), the scored samples to
    evaluate on."""
    pool, scored = unlabeled_pool(spec, split)
    return dataclasses.replace(split, x_train=pool, x_val=split.x_val[scored],
                               y_train=None, y_val=None)  # fmt: skip


def _cross_entropy(model: nn.Module, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def _joint(weight: float, kind: str) -> Callable[[nn.Module, Batch], torch.Tensor]:
    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        x, x_labeled, y_labeled = batch  # every input, and as many labeled ones (_tiled)
        x_hat, logits = model(x, x_labeled)
        return joint_loss(x_hat, x, logits, y_labeled, weight, kind)

    return loss


def _tiled(
    x: np.ndarray, y: np.ndarray, length: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The labeled set repeated in shuffled rounds to `length` rows: each batch of every
    input is paired with as many labeled ones, however few labels there are."""
    rng = np.random.default_rng(seed)
    rounds = -(-length // len(x))
    order = np.concatenate([rng.permutation(len(x)) for _ in range(rounds)])[:length]
    return x[order], y[order]

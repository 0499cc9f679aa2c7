"""The semisupervised methods' math, checked against brute force (no Ray): the joint loss,
label spreading's closed form, the pseudo-labels, and the stacked decoder's nonlinearity."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from shared.specs import LayerSpec, ObjectiveSpec, SemisupervisedSpec, parse_job_spec
from shared.stages import plan_stages
from workers.classifier import (
    Classifier,
    JointClassifier,
    joint_loss,
    knn_affinity,
    pseudo_labels,
    scoring_model,
    spread_labels,
)
from workers.objectives import evaluate_reconstruction
from workers.stack import build_stack, layer_model
from workers.tasks import _tiled, build_task, job_split, lr_field, unlabeled_pool

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_the_joint_loss_is_cross_entropy_plus_weighted_reconstruction(loss: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, generator=g)
    x_hat = torch.rand(5, 3, generator=g) * 0.9 + 0.05
    logits = torch.randn(4, 3, generator=g)
    y = torch.tensor([0, 2, 1, 2])
    ce = 0.0
    for row, label in zip(logits.tolist(), y.tolist(), strict=True):
        ce += -(row[label] - math.log(sum(math.exp(v) for v in row)))
    ce /= len(y)
    terms = []
    for a, b in zip(x_hat.flatten().tolist(), x.flatten().tolist(), strict=True):
        if loss == "mse":
            terms.append((a - b) ** 2)
        else:
            terms.append(-(b * math.log(a) + (1 - b) * math.log(1 - a)))
    reconstruction = sum(terms) / len(terms)
    got = joint_loss(x_hat, x, logits, y, 0.3, loss)
    assert float(got) == pytest.approx(ce + 0.3 * reconstruction, rel=1e-5)


def test_a_joint_classifier_reconstructs_one_batch_and_classifies_the_other_in_one_pass() -> None:
    encoder, decoder = nn.Linear(6, 4), nn.Linear(4, 6)
    joint = JointClassifier(Classifier(encoder, 4, (5,), 3), decoder)
    x, x_labeled = torch.randn(7, 6), torch.randn(2, 6)
    x_hat, logits = joint(x, x_labeled)
    assert torch.allclose(x_hat, decoder(encoder(x)), atol=1e-6)
    assert torch.allclose(logits, joint.classifier(x_labeled), atol=1e-6)
    joint_loss(x_hat, x, logits, torch.tensor([0, 1]), 1.0, "mse").backward()
    # one backward reaches every parameter: what DDP needs of a single forward
    assert all(p.grad is not None for p in joint.parameters())
    assert scoring_model(joint) is joint.classifier


def _dense_spreading(codes: np.ndarray, labels: np.ndarray, classes: int, neighbors: int,
                     alpha: float) -> np.ndarray:  # fmt: skip
    """Zhou et al.'s closed form, with dense matrices and loops: the reference."""
    n = len(codes)
    distances = np.array([[np.linalg.norm(codes[i] - codes[j]) for j in range(n)]
                          for i in range(n)])  # fmt: skip
    near = np.zeros((n, n), dtype=bool)
    for i in range(n):
        order = [j for j in np.argsort(distances[i], kind="stable") if j != i]
        near[i, order[:neighbors]] = True
    sigma = np.median(distances[near])
    w = np.where(near | near.T, np.exp(-((distances / sigma) ** 2)), 0.0)
    d = np.diag(1 / np.sqrt(w.sum(axis=1)))
    y = np.zeros((n, classes))
    for i, label in enumerate(labels):
        if label >= 0:
            y[i, label] = 1
    f = (1 - alpha) * np.linalg.inv(np.eye(n) - alpha * d @ w @ d) @ y
    return f / f.sum(axis=1, keepdims=True)


def test_label_spreading_matches_the_dense_closed_form() -> None:
    rng = np.random.default_rng(0)
    codes = rng.normal(size=(30, 4))
    labels = np.full(30, -1)
    labels[[0, 5, 11, 20]] = [0, 1, 2, 1]
    got = spread_labels(codes, labels, 3, neighbors=5, alpha=0.9)
    want = _dense_spreading(codes, labels, 3, 5, 0.9)
    assert np.allclose(got, want, atol=1e-10)
    assert np.allclose(knn_affinity(codes, 5).toarray(), knn_affinity(codes, 5).T.toarray())


def test_one_label_per_cluster_spreads_to_the_whole_cluster() -> None:
    rng = np.random.default_rng(1)
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = np.repeat([0, 1, 2], 40)
    codes = centers[truth] + rng.normal(scale=0.5, size=(120, 2))
    labels = np.full(120, -1)
    labels[[0, 40, 80]] = [0, 1, 2]
    scores = spread_labels(codes, labels, 3, neighbors=8, alpha=0.99)
    assert (scores.argmax(axis=1) == truth).all()
    index, spread = pseudo_labels(scores, labels, 0.0)
    assert len(index) == 120 and (spread == truth).all()


def test_pseudo_labels_keep_known_labels_and_drop_unsure_or_unreached_points() -> None:
    scores = np.array([[0.2, 0.8], [0.55, 0.45], [0.9, 0.1], [0.0, 0.0]])
    labels = np.array([0, -1, -1, -1])
    index, spread = pseudo_labels(scores, labels, 0.6)
    # 0: known (kept as 0 though spreading says 1); 1: 0.55 < 0.6; 3: reached by no label
    assert index.tolist() == [0, 2] and spread.tolist() == [0, 0]
    index, spread = pseudo_labels(scores, labels, 0.0)
    assert index.tolist() == [0, 1, 2] and spread.tolist() == [0, 0, 0]


def test_tiling_repeats_every_label_before_any_twice_more() -> None:
    x, y = np.arange(3.0)[:, None], np.arange(3)
    x_tiled, y_tiled = _tiled(x, y, 8, seed=0)
    assert len(y_tiled) == 8 and (x_tiled[:, 0] == y_tiled).all()
    assert sorted(y_tiled[:3]) == [0, 1, 2] and sorted(y_tiled[3:6]) == [0, 1, 2]


def test_a_stacked_decoder_is_nonlinear_between_its_layers() -> None:
    layers = (LayerSpec(units=8, activation="relu"), LayerSpec(units=4, activation="linear"))
    second = layer_model(layers[1], 8, layers[0])
    assert isinstance(list(second.decoder)[-1], nn.ReLU)  # it reconstructs ReLU codes
    first = layer_model(layers[0], 16, None)
    assert isinstance(list(first.decoder)[-1], nn.Identity)  # mse data: unbounded
    bce = LayerSpec(units=8, objective=ObjectiveSpec(loss="bce"))
    assert isinstance(list(layer_model(bce, 16, None).decoder)[-1], nn.Sigmoid)
    stack = build_stack(layers, 16)
    assert [type(m) for m in stack.decoder] == [nn.Linear, nn.ReLU, nn.Linear, nn.Identity]


def test_the_stacked_baseline_trains_the_whole_shape_from_random_weights() -> None:
    spec = parse_job_spec({"kind": "stacked", "data": {"dataset": "digits"},
                           "layers": [{"units": 16, "activation": "relu"}, {"units": 4}],
                           "training": {"epochs": 3}, "finetune": {"epochs": 2, "lr": 0.01}})
    baseline = plan_stages(spec)[-1]
    task = build_task(spec, baseline, {}, None)
    assert task.training.epochs == 2 * 3 + 2 and task.training.lr == 0.01
    assert [p.shape for p in task.model.parameters()] == [
        p.shape for p in build_stack(spec.layers, 64).parameters()]  # type: ignore[union-attr]
    assert lr_field(spec, baseline) == "finetune.lr"
    assert task.arrays[0].shape[1] == 64  # the data itself, not a layer's codes


def test_a_semisupervised_pretraining_fits_every_input_but_the_test_and_scored_samples() -> None:
    spec = parse_job_spec({"kind": "semisupervised", "data": {"dataset": "digits"},
                           "labeled_fraction": 0.05,
                           "pretrain": {"kind": "autoencoder", "model": {"hidden": [16],
                                        "latent_dim": 4}, "training": {"epochs": 1}},
                           "head": {"method": "label_spreading"}})  # fmt: skip
    assert isinstance(spec, SemisupervisedSpec)
    split = job_split(spec, None)
    assert split.x_test is not None and split.y_val is not None
    pool, scored = unlabeled_pool(spec, split)
    # The training split first (the labeled subset's indices point into it), then the
    # validation samples whose labels are never read; the scored ones are held out of both.
    unscored = np.ones(len(split.x_val), dtype=bool)
    unscored[scored] = False
    assert 0 < len(scored) < len(split.x_val)
    assert np.array_equal(pool, np.concatenate([split.x_train, split.x_val[unscored]]))

    pretrain = plan_stages(spec)[0]
    task = build_task(spec, pretrain, {}, None)
    assert np.array_equal(task.arrays[0], pool)  # fitted on the pool...
    # ...and evaluated on the scored samples alone, which no stage trains on.
    objective = spec.pretrain.objective  # type: ignore[union-attr]
    held_out = evaluate_reconstruction(task.model, torch.from_numpy(split.x_val[scored]),
                                       objective)  # fmt: skip
    assert task.evaluate(task.model)["val_mse"] == pytest.approx(held_out["val_mse"])

"""The results and artifacts of a finished job, for each kind of job."""

from pathlib import Path
from typing import Any

from torch import nn

from shared.jobs import JobRecord
from shared.metrics import json_safe
from shared.specs import AutoencoderSpec, ObjectiveSpec, SemisupervisedSpec, StackedSpec
from workers.artifacts import ArtifactWriter, final_metrics
from workers.checkpoints import load_state
from workers.classifier import scoring_model
from workers.models import NormalizedEncoder, build_model
from workers.stack import build_stack
from workers.tasks import build_classifier, find_stage, job_split


def finalize(
    job: JobRecord,
    checkpoints: dict[str, str],
    history: list[dict[str, Any]],
    folder: Path,
    timings: dict[str, float],
    datasets: str | Path,
) -> dict[str, Any]:
    """Evaluate the finished job and write its artifacts; returns metrics and names.

    `datasets` is the folder of uploaded datasets (Storage.datasets_location).
    """
    spec = job.spec
    split = job_split(spec, datasets)
    writer = ArtifactWriter(folder, split)
    if isinstance(spec, AutoencoderSpec):
        model = build_model(spec.model, spec.data.input_shape, spec.objective.loss)
        model.load_state_dict(load_state(checkpoints["train"])["model"])
        metrics = final_metrics(model.eval(), spec.objective, spec.model.latent_dim, split)
        writer.autoencoder(model, spec.objective.denoising, spec.data.input_shape)
        description = {
            "arch": spec.model.arch,
            "model": spec.model.model_dump(mode="json"),
            "latent_dim": spec.model.latent_dim,
            "loss": spec.objective.loss,
        }
    elif isinstance(spec, StackedSpec):
        stack = _final_stack(spec, checkpoints)
        last = spec.layers[-1].units
        metrics = final_metrics(stack, ObjectiveSpec(), last, split)
        for i in range(len(spec.layers)):
            layer = job.stage(f"layer{i + 1}")
            metrics[f"layer{i + 1}_val_mse"] = layer.result["val_mse"]
        if spec.baseline:  # the same shape from scratch: what pretraining bought, if anything
            scratch = job.stage("baseline").result["val_mse"]
            metrics["baseline_val_mse"] = scratch
            metrics["pretraining_gain"] = scratch - metrics["val_mse"]
        writer.autoencoder(stack, None, spec.data.input_shape)
        description = {
            "arch": "stacked",
            "latent_dim": last,
            "layers": [layer.model_dump(mode="json") for layer in spec.layers],
        }
    else:
        metrics, description = _semisupervised(spec, job, checkpoints, writer)
    writer.json("model.json", {
        **description,
        "input_shape": list(spec.data.input_shape),
        "normalization": split.normalization.to_json(),
        "input": "raw features: the exported modules include the normalization",
    })  # fmt: skip
    writer.jsonl("metrics.jsonl", [json_safe(row) for row in history])
    writer.curves(history, [stage.name for stage in job.stages])
    writer.tensorboard(history, {stage.name: stage.started_at.timestamp()
                                 for stage in job.stages if stage.started_at})  # fmt: skip
    metrics.update(timings)
    if timings["train_seconds"] > 0 and isinstance(spec, AutoencoderSpec):
        epochs = sum(1 for m in history if m["stage"] == "train")
        metrics["samples_per_s"] = len(split.x_train) * epochs / timings["train_seconds"]
    metrics = json_safe(metrics)  # e.g. mse_ratio_vs_pca is inf when PCA is exact
    names = writer.result(job.id, metrics)
    return {"metrics": metrics, "artifacts": names}


def _final_stack(spec: StackedSpec, checkpoints: dict[str, str]) -> nn.Module:
    if spec.finetune is not None:
        stack = build_stack(spec.layers, spec.data.input_dim)
        stack.load_state_dict(load_state(checkpoints["finetune"])["model"])
    else:
        layer_checkpoints = [checkpoints[f"layer{i + 1}"] for i in range(len(spec.layers))]
        stack = build_stack(spec.layers, spec.data.input_dim, layer_checkpoints)
    return stack.eval()


def _semisupervised(
    spec: SemisupervisedSpec,
    job: JobRecord,
    checkpoints: dict[str, str],
    writer: ArtifactWriter,
) -> tuple[dict[str, Any], dict[str, Any]]:
    head = job.stage("head").result
    metrics: dict[str, Any] = {
        "head_accuracy": head["test_accuracy"],
        "head_val_accuracy": head["val_accuracy"],
        "labeled": head["labeled"],
    }
    if spec.baseline:
        baseline = job.stage("baseline").result
        metrics["baseline_accuracy"] = baseline["test_accuracy"]
        metrics["accuracy_gain"] = head["test_accuracy"] - baseline["test_accuracy"]
    if "pseudo_labeled" in head:
        metrics["pseudo_labeled"] = head["pseudo_labeled"]
    classes = int(head["classes"])
    trained = build_classifier(spec, find_stage(spec, "head"), checkpoints, classes)
    trained.load_state_dict(load_state(checkpoints["head"])["model"])
    classifier = scoring_model(trained)  # a joint head's decoder is not exported
    writer.encoder(classifier.encoder)  # fine-tuned by the head when finetune_encoder is on
    writer.module("classifier.pt", NormalizedEncoder(classifier, writer.shift, writer.scale))
    description = {"arch": "classifier", "pretrain": spec.pretrain.model_dump(mode="json"),
                   "head": spec.head.model_dump(mode="json"), "classes": classes,
                   "finetune_encoder": spec.finetune_encoder,
                   "method": spec.head.method}  # fmt: skip
    return metrics, description

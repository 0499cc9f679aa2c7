"""Specs the tests submit: tiny and quick on 2 cores."""

from typing import Any


def digits_spec(epochs: int = 3, workers: int = 1, **training: Any) -> dict[str, Any]:
    return {
        "kind": "autoencoder",
        "name": "digits-dense",
        "data": {"dataset": "digits", "validation_fraction": 0.2, "seed": 0},
        "model": {"arch": "dense", "hidden": [128], "latent_dim": 16, "activation": "relu"},
        "objective": {"loss": "mse"},
        "training": {"epochs": epochs, "batch_size": 128, "lr": 0.001, "seed": 0,
                     "checkpoint_every": 5, **training},
        "resources": {"workers": workers},
    }  # fmt: skip


def set_field(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Set the field at a dotted path (`training.epochs`) of a spec document; returns it."""
    *parents, leaf = path.split(".")
    node = doc
    for part in parents:
        node = node[part]
    node[leaf] = value
    return doc

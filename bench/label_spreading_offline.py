"""Label spreading on digits with 5% of the labels, offline: which choices move the accuracy.

    .venv/bin/python bench/label_spreading_offline.py [--seeds 0 1 2 3 4]

Plain PyTorch and scikit-learn, no service: the splits of a semisupervised job (test 20%
carved first, validation 20% of the rest, 5% of the training split labelled: 57 labels), the
example's denoising autoencoder (64-256-128-32 ReLU, Gaussian noise 0.2, 200 epochs, batch
64, lr 0.002), label spreading (k-NN graph, alpha 0.99) over its codes, and test accuracy read
out by a k-NN over the spread labels. It varies what the autoencoder is fitted on (the
training inputs, or training and validation inputs: labels unused either way), which points
the graph spans, and how the codes are scaled, and prints mean ± std over the seeds and each
variant's paired difference with the service's choice (train, train, raw codes). Issue 13's
target for this setting is 95% test accuracy.
"""

import argparse
import statistics
import time

import numpy as np
import torch
from label_spreading_representations import EXAMPLE, codes_of
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler
from sklearn.semi_supervised import LabelSpreading

NEIGHBORS, ALPHA = 10, 0.99
SERVICE = ("train", "train", "raw")  # what the service does today (workers/tasks.py)


def accuracies(seed: int) -> dict[tuple[str, str, str], float]:
    x, y = load_digits(return_X_y=True)
    index = np.arange(len(x))
    rest, test = train_test_split(index, test_size=0.2, random_state=seed, stratify=y)
    train, val = train_test_split(rest, test_size=0.2, random_state=seed, stratify=y[rest])
    low, high = x[train].min(0), x[train].max(0)
    scaled = ((x - low) / np.where(high - low > 1e-12, high - low, 1.0)).astype(np.float32)
    labeled, _ = train_test_split(np.arange(len(train)), train_size=round(0.05 * len(train)),
                                  random_state=seed, stratify=y[train])  # fmt: skip
    found = {}
    for fitted_on, fit in (("train", train), ("train+val", rest)):
        codes = codes_of(EXAMPLE, scaled[fit], scaled, seed)
        for spans, points in (("train", train), ("train+val", np.concatenate([train, val]))):
            for scaling in ("raw", "standardized"):
                rep = codes
                if scaling == "standardized":
                    rep = StandardScaler().fit(codes[points]).transform(codes)
                labels = np.full(len(points), -1)
                labels[labeled] = y[train][labeled]  # train comes first in `points`
                spreading = LabelSpreading(kernel="knn", n_neighbors=NEIGHBORS, alpha=ALPHA,
                                           max_iter=1000).fit(rep[points], labels)  # fmt: skip
                readout = KNeighborsClassifier(n_neighbors=NEIGHBORS)
                readout.fit(rep[points], spreading.transduction_)
                found[(fitted_on, spans, scaling)] = 100 * float(
                    (readout.predict(rep[test]) == y[test]).mean()
                )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    torch.set_num_threads(2)
    runs: dict[tuple[str, str, str], list[float]] = {}
    for seed in args.seeds:
        started = time.monotonic()
        for variant, accuracy in accuracies(seed).items():
            runs.setdefault(variant, []).append(accuracy)
        print(f"seed {seed}: {time.monotonic() - started:.0f} s", flush=True)
    base = runs[SERVICE]
    print(f"\ndigits, 5% of the training labels ({len(args.seeds)} seeds), test accuracy %:")
    print(
        "| autoencoder fitted on | graph over | codes | accuracy | vs the service's | paired SE |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for variant, accs in sorted(runs.items(), key=lambda kv: -statistics.mean(kv[1])):
        diffs = [a - b for a, b in zip(accs, base, strict=True)]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
        print(
            f"| {variant[0]} | {variant[1]} | {variant[2]} | {statistics.mean(accs):.1f} ± "
            f"{spread:.1f} | {statistics.mean(diffs):+.1f} | {se:.1f} |"
        )


if __name__ == "__main__":
    main()

"""What pretraining buys a classifier that sees few labels, through the service.

    .venv/bin/python bench/semisupervised.py [--seeds 3] [--skip-mnist]

Runs examples/semisupervised-digits.yaml at 1%, 2%, 5% and 10% of the digits labels, and the
same pipeline on mnist5k with 100 and 500 labels, over several seeds (each seed changes the
splits, the labeled subset and the initial weights). Prints head and baseline test accuracy
(mean ± std) and their paired difference per setting.
"""

import argparse
import copy
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml
from harness import local_service

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "semisupervised-digits.yaml"


def settings(skip_mnist: bool) -> list[tuple[str, dict[str, Any]]]:
    rows: list[tuple[str, dict[str, Any]]] = [
        (f"digits {p:g}%", {"labeled_fraction": p / 100}) for p in (1, 2, 5, 10)
    ]
    if not skip_mnist:
        rows += [(f"mnist5k {n} labels", {"dataset": "mnist5k", "labeled_count": n})
                 for n in (100, 500)]  # fmt: skip
    return rows


def spec_for(base: dict[str, Any], change: dict[str, Any], seed: int) -> dict[str, Any]:
    spec = copy.deepcopy(base)
    spec["data"] = {**spec["data"], "seed": seed, "dataset": change.get("dataset", "digits")}
    spec.pop("labeled_fraction", None)
    spec.update({k: v for k, v in change.items() if k != "dataset"})
    spec["pretrain"]["training"] = {**spec["pretrain"].get("training", {}), "seed": seed}
    return spec


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):5.1f} ± {100 * spread:4.1f}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--skip-mnist", action="store_true")
    args = parser.parse_args()
    base = yaml.safe_load(EXAMPLE.read_text())
    table = []
    with local_service() as service:
        for name, change in settings(args.skip_mnist):
            heads, baselines = [], []
            for seed in range(args.seeds):
                job, wall = service.run(spec_for(base, change, seed))
                metrics = job["result"]["metrics"]
                heads.append(metrics["head_accuracy"])
                baselines.append(metrics["baseline_accuracy"])
                print(f"  {name} seed {seed}: head {metrics['head_accuracy']:.3f} baseline "
                      f"{metrics['baseline_accuracy']:.3f} ({int(metrics['labeled'])} labels, "
                      f"{wall:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
            gains = [h - b for h, b in zip(heads, baselines, strict=True)]
            table.append((name, mean_std(heads), mean_std(baselines), mean_std(gains)))
    print(
        f"test accuracy in %, mean ± std over {args.seeds} seeds "
        f"(pretrain: denoising AE, 32-d code; head: one hidden layer of 64, frozen encoder)"
    )
    print(f"| {'setting':<18} | {'head':>12} | {'baseline':>12} | {'head - baseline':>15} |")
    print(f"|{'-' * 20}|{'-' * 14}|{'-' * 14}|{'-' * 17}|")
    for name, head, baseline, gain in table:
        print(f"| {name:<18} | {head:>12} | {baseline:>12} | {gain:>15} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

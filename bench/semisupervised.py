"""What each semi-supervised method buys a classifier that sees few labels, through the service.

    .venv/bin/python bench/semisupervised.py [--seeds 3] [--methods label_spreading joint mlp]
        [--settings digits-1 digits-5 mnist5k-100 ...] [--out runs.jsonl] [--table-only]

Runs examples/semisupervised-digits.yaml at 1%, 2%, 5% and 10% of the digits labels and
examples/semisupervised-mnist5k.yaml with 100 and 500 labels, with each `head.method`, over
several seeds (a seed changes the splits, the labeled subset and the initial weights). Every
job also trains the supervised baseline (the same MLP head on the labeled raw inputs), so each
method is compared with it on the same labels: the table has test accuracy mean ± std, the
paired difference and whether it is beyond 2 standard errors, and each job's wall time.

Each finished job is appended to --out as one JSON line, so a long bench can run in pieces
(a few settings at a time) and --table-only prints the table of everything measured so far.
"""

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml
from paired import beyond_two_se, mean_std

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# setting -> (example, the labels it asks for)
SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    **{f"digits-{p}": ("semisupervised-digits.yaml", {"labeled_fraction": p / 100})
       for p in (1, 2, 5, 10)},
    **{f"mnist5k-{n}": ("semisupervised-mnist5k.yaml", {"labeled_count": n}) for n in (100, 500)},
}  # fmt: skip
# What each method changes in the example's head (the example is label_spreading's).
METHODS: dict[str, dict[str, Any]] = {
    "label_spreading": {},
    "joint": {"method": "joint", "reconstruction_weight": 10.0, "neighbors": None,
              "alpha": None},
    "mlp": {"method": "mlp", "neighbors": None, "alpha": None},
}  # fmt: skip
TARGETS = {("digits-5", "label_spreading"): "≥ 95% test accuracy",
           ("mnist5k-100", "label_spreading"): "≥ baseline + 10 points"}  # fmt: skip


def spec_for(setting: str, method: str, seed: int) -> dict[str, Any]:
    example, labels = SETTINGS[setting]
    spec: dict[str, Any] = yaml.safe_load((EXAMPLES / example).read_text())
    spec = copy.deepcopy(spec)
    spec.pop("labeled_fraction", None)
    spec.pop("labeled_count", None)
    spec.update(labels)
    spec["data"] = {**spec["data"], "seed": seed}
    spec["pretrain"]["training"] = {**spec["pretrain"].get("training", {}), "seed": seed}
    head = {**spec["head"], **METHODS[method]}
    spec["head"] = {k: v for k, v in head.items() if v is not None}
    spec["name"] = f"bench-{setting}-{method}-{seed}"
    return spec


def percent(values: list[float]) -> str:
    return mean_std(values, scale=100, digits=1)


def print_table(rows: list[dict[str, Any]]) -> None:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["setting"], row["method"]), []).append(row)
    print("| setting | labels | method | method acc. | baseline acc. | paired diff. | > 2 SE | "
          "job wall s | target |")  # fmt: skip
    print("| --- | ---: | --- | ---: | ---: | ---: | :---: | ---: | --- |")
    order = list(SETTINGS)
    for setting, method in sorted(groups, key=lambda key: (order.index(key[0]), key[1])):
        runs = groups[(setting, method)]
        runs = sorted(runs, key=lambda r: r["seed"])
        heads = [r["head_accuracy"] for r in runs]
        baselines = [r["baseline_accuracy"] for r in runs]
        gains = [h - b for h, b in zip(heads, baselines, strict=True)]
        target = TARGETS.get((setting, method), "")
        if target:
            met = (statistics.mean(heads) >= 0.95 if setting == "digits-5"
                   else statistics.mean(gains) >= 0.10)  # fmt: skip
            target = f"{target}: {'met' if met else 'not met'}"
        wall = statistics.mean(r["wall_s"] for r in runs)
        print(f"| {setting} ({len(runs)} seeds) | {int(runs[0]['labeled'])} | {method} | "
              f"{percent(heads)} | {percent(baselines)} | {percent(gains)} | "
              f"{beyond_two_se(gains)} | {wall:.0f} | {target} |")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--out", type=Path, default=Path("bench-semisupervised.jsonl"))
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if not args.table_only:
        from harness import local_service

        with local_service() as service, args.out.open("a") as out:
            for setting in args.settings:
                for method in args.methods:
                    for seed in range(args.seeds):
                        job, wall = service.run(spec_for(setting, method, seed))
                        metrics = job["result"]["metrics"]
                        row = {"setting": setting, "method": method, "seed": seed,
                               "wall_s": wall, **{k: metrics[k] for k in (
                                   "head_accuracy", "baseline_accuracy", "labeled")}}  # fmt: skip
                        out.write(json.dumps(row) + "\n")
                        out.flush()
                        print(f"  {setting} {method} seed {seed}: {metrics['head_accuracy']:.3f} "
                              f"vs baseline {metrics['baseline_accuracy']:.3f} ({wall:.0f} s)",
                              file=sys.stderr, flush=True)  # fmt: skip
    rows = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
    print(f"test accuracy in %, mean ± std over seeds; paired diff. = method - baseline on the "
          f"same labels; {args.out}")  # fmt: skip
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

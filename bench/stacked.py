"""Whether greedy pretraining earns its keep, through the service: the stacked examples against
PCA at the same code size and against the same deep shape trained from scratch.

    .venv/bin/python bench/stacked.py [--seeds 3] [--examples stacked-digits stacked-mnist5k]
        [--out runs.jsonl] [--table-only]

Each job of examples/stacked-*.yaml trains its layers, the fine-tune and (its `baseline`
stage) the same shape from random weights for as many epochs as the other stages together;
the result holds all three validation MSEs on the same split. A seed changes the split and
the initial weights. Each finished job is appended to --out as one JSON line, so the bench
can run in pieces; --table-only prints the table of what was measured so far.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml
from paired import beyond_two_se, mean_std

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NAMES = ("stacked-digits", "stacked-mnist5k")


def spec_for(name: str, seed: int) -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    spec["data"] = {**spec["data"], "seed": seed}
    spec["training"] = {**spec.get("training", {}), "seed": seed}
    spec["name"] = f"bench-{name}-{seed}"
    return spec


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| example | code | stack (pretrained + fine-tuned) | from scratch | PCA | "
          "stack - PCA | < 0 by 2 SE | stack - scratch | < 0 by 2 SE | job wall s |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | :---: | ---: | :---: | ---: |")
    for name in NAMES:
        runs = sorted((r for r in rows if r["example"] == name), key=lambda r: r["seed"])
        if not runs:
            continue
        stack = [r["val_mse"] for r in runs]
        scratch = [r["baseline_val_mse"] for r in runs]
        pca = [r["pca_val_mse"] for r in runs]
        vs_pca = [s - p for s, p in zip(stack, pca, strict=True)]
        vs_scratch = [s - b for s, b in zip(stack, scratch, strict=True)]
        wall = statistics.mean(r["wall_s"] for r in runs)
        print(f"| {name} ({len(runs)} seeds) | {runs[0]['code']} | {mean_std(stack)} | "
              f"{mean_std(scratch)} | {mean_std(pca)} | {mean_std(vs_pca)} | "
              f"{beyond_two_se(vs_pca, sign=-1)} | {mean_std(vs_scratch)} | "
              f"{beyond_two_se(vs_scratch, sign=-1)} | {wall:.0f} |")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--examples", nargs="+", default=list(NAMES), choices=NAMES)
    parser.add_argument("--out", type=Path, default=Path("bench-stacked.jsonl"))
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if not args.table_only:
        from harness import local_service

        with local_service() as service, args.out.open("a") as out:
            for name in args.examples:
                for seed in range(args.seeds):
                    spec = spec_for(name, seed)
                    job, wall = service.run(spec)
                    metrics = job["result"]["metrics"]
                    row = {"example": name, "seed": seed, "wall_s": wall,
                           "code": spec["layers"][-1]["units"],
                           **{k: metrics[k] for k in ("val_mse", "baseline_val_mse",
                                                      "pca_val_mse")}}  # fmt: skip
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                    print(f"  {name} seed {seed}: stack {metrics['val_mse']:.5f} scratch "
                          f"{metrics['baseline_val_mse']:.5f} pca {metrics['pca_val_mse']:.5f} "
                          f"({wall:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
    rows = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
    print(f"validation MSE (normalized inputs), mean ± std over seeds; differences paired by "
          f"seed; {args.out}")  # fmt: skip
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

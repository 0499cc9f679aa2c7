"""What each autoencoder of the lecture learns, through the service, next to PCA.

    .venv/bin/python bench/quality.py [--skip-mnist]

Runs every spec in `examples/` as a job and prints one table of the autoencoders:
variant, code size, validation MSE, PCA MSE at that size, ratio, mean activation, Jacobian
norm, wall time. Then checks the claims the variants exist for, and exits 1 if one fails.
"""

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from harness import local_service

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MNIST_PIXELS = 784
# Hinton & Salakhutdinov (2006), full MNIST, 30-d code: summed squared error per test image.
HINTON_2006 = {"deep autoencoder": 3.00, "PCA": 13.87}


def fmt(value: Any, digits: int = 5) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-mnist", action="store_true")
    args = parser.parse_args()
    paths = [p for p in sorted(EXAMPLES.glob("*.yaml"))
             if not (args.skip_mnist and p.name.startswith("mnist5k"))]  # fmt: skip
    rows: dict[str, dict[str, Any]] = {}
    with local_service() as service:
        for path in paths:
            spec = yaml.safe_load(path.read_text())
            job, wall = service.run(spec)
            rows[path.stem] = {
                "code": spec.get("model", {}).get("latent_dim"),
                "wall": wall,
                **job["result"]["metrics"],
            }
            print(f"  done {path.stem} in {wall:.1f} s", file=sys.stderr, flush=True)

    pipelines = {n: r for n, r in rows.items() if "val_mse" not in r or "layer1_val_mse" in r}
    rows = {n: r for n, r in rows.items() if n not in pipelines}
    header = (f"{'variant':<28}{'code':>5}{'val_mse':>10}{'pca_mse':>10}{'ratio':>7}"
              f"{'mean_act':>9}{'jac_fro':>9}{'wall_s':>8}")  # fmt: skip
    print(header)
    for name, r in rows.items():
        print(f"{name:<28}{r['code']:>5}{fmt(r['val_mse']):>10}{fmt(r.get('pca_val_mse')):>10}"
              f"{fmt(r.get('mse_ratio_vs_pca'), 2):>7}{fmt(r['mean_activation'], 3):>9}"
              f"{fmt(r['jacobian_fro'], 3):>9}{r['wall']:>8.1f}")  # fmt: skip

    for name, r in pipelines.items():
        shown = {k: round(v, 4) for k, v in r.items() if k.endswith(("mse", "accuracy", "gain"))}
        print(f"{name}: {shown} ({r['wall']:.1f} s)")

    checks = [
        ("nonlinear dense AE (code 16) beats PCA", rows["digits-deep"]["mse_ratio_vs_pca"] < 1.0),
        ("linear AE matches PCA within 5%",
         abs(rows["digits-linear"]["mse_ratio_vs_pca"] - 1.0) < 0.05),
        ("KL-sparse mean activation within 30% of its target 0.05",
         abs(rows["digits-overcomplete-sparse"]["mean_activation"] - 0.05) < 0.015),
        ("contractive Jacobian norm below half the plain one-layer model's",
         rows["digits-contractive"]["jacobian_fro"]
         < 0.5 * rows["digits-onelayer-sigmoid"]["jacobian_fro"]),
    ]  # fmt: skip
    if not args.skip_mnist:
        print("\nmnist5k, 30-d code, summed squared error per validation image (pixels in [0, 1]):")
        for name in ("mnist5k-deep", "mnist5k-conv"):
            r = rows[name]
            print(f"  {name:<14} AE {r['val_mse'] * MNIST_PIXELS:6.2f}   "
                  f"PCA {r['pca_val_mse'] * MNIST_PIXELS:6.2f}")  # fmt: skip
        print(
            f"  Hinton & Salakhutdinov 2006 (full MNIST, 60k images): deep AE "
            f"{HINTON_2006['deep autoencoder']:.2f}, PCA {HINTON_2006['PCA']:.2f}"
        )
        checks.append(("mnist5k: the deep AE beats PCA",
                       rows["mnist5k-deep"]["mse_ratio_vs_pca"] < 1.0))  # fmt: skip
    print()
    for claim, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {claim}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())

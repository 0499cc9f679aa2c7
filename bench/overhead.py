"""What a job costs beyond its training: the example spec as a bare loop and through aetrain.

    .venv/bin/python bench/overhead.py [--epochs 30] [--repeats 2]

Starts the service on this machine (bench/harness.py) and prints one line per setting with
wall time, the time spent in epochs, validation MSE and the ratio to the bare loop.
"""

import argparse
import os
import statistics
import time

import ray
import torch
from harness import local_service
from torch.utils.data import DataLoader, TensorDataset

from shared.specs import parse_job_spec
from tests.specs import digits_spec
from workers.data import build_datasets
from workers.losses import reconstruction_loss
from workers.models import build_model


def bare_loop(epochs: int) -> tuple[float, float]:
    """The same model, data and optimizer in a plain loop: (seconds, val_mse).

    With torch's threads as set by the caller: one per Ray worker CPU in a job.
    """
    spec = parse_job_spec(digits_spec(epochs=epochs))
    split = build_datasets(spec.data)
    torch.manual_seed(0)
    model = build_model(spec.model, spec.data.input_shape, "mse")
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.training.lr)
    loader = DataLoader(TensorDataset(torch.from_numpy(split.x_train)), batch_size=128,
                        shuffle=True)  # fmt: skip
    started = time.perf_counter()
    for _ in range(epochs):
        for (xb,) in loader:
            loss = reconstruction_loss(model(xb)[0], xb, "mse")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - started
    with torch.no_grad():
        x_val = torch.from_numpy(split.x_val)
        return seconds, float(torch.mean((model(x_val)[0] - x_val) ** 2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    default_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a Ray Train worker with one CPU runs with
    bare = [bare_loop(args.epochs) for _ in range(args.repeats)]
    bare_s = statistics.median(s for s, _ in bare)
    torch.set_num_threads(default_threads)
    crowded_s = bare_loop(args.epochs)[0]
    rows = [
        ("bare loop, 1 thread", bare_s, bare_s, bare[-1][1]),
        (f"bare loop, {default_threads} threads", crowded_s, crowded_s, bare[-1][1]),
    ]
    with local_service() as service:
        for workers in (1, 2):
            runs = [service.run(digits_spec(epochs=args.epochs, workers=workers))
                    for _ in range(args.repeats)]  # fmt: skip
            metrics = [job["result"]["metrics"] for job, _ in runs]
            name = f"aetrain job, {workers} rank{'s' if workers > 1 else ''}"
            rows.append((
                name,
                statistics.median(wall for _, wall in runs),
                statistics.median(m["train_seconds"] for m in metrics),
                metrics[-1]["val_mse"],
            ))  # fmt: skip

    print(
        f"digits-dense example, {args.epochs} epochs, median of {args.repeats}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, ray {ray.__version__}"
    )
    print(f"{'setting':<24}{'wall_s':>9}{'epochs_s':>10}{'val_mse':>10}{'wall/bare':>11}")
    for name, wall, train, mse in rows:
        print(f"{name:<24}{wall:>9.2f}{train:>10.2f}{mse:>10.5f}{wall / bare_s:>11.1f}")


if __name__ == "__main__":
    main()

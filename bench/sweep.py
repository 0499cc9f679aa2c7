"""A sweep of small jobs submitted at once to a warm stack, against a bare script that trains
them one after another.

    .venv/bin/python bench/sweep.py [--jobs 20] [--epochs 10] [--runs 3]

Starts one `aetrain up` (bench/stack.py) and runs a throwaway job so that its one-worker
group is ready. Then, `--runs` times in turn:

  service  `--jobs` digits autoencoders (examples/digits-dense.yaml with `--epochs` epochs
           and `model.latent_dim` 2, 4, ... 40) POSTed back to back; wall time from the first
           POST until a GET has shown every one `succeeded` (each polled every 50 ms).
  bare     the same trainings one after another in one fresh `python` (imports included,
           torch on one thread), bench/overhead.py's bare script; wall time from outside.

The dispatcher has 4 slots (AETRAIN_DISPATCHER_SLOTS) and Ray 2 CPUs here, so two one-worker
groups can train at once: the warm one, and a second one the sweep starts. Nothing is asserted.
"""

import argparse
import os
import statistics
import time
from datetime import datetime
from importlib.metadata import version
from typing import Any

from overhead import load_example, run_bare
from stack import TERMINAL, JobFailed, Stack, running_stack


def sweep_specs(jobs: int, epochs: int) -> list[dict[str, Any]]:
    base = load_example("digits-dense.yaml")
    specs = []
    for i in range(jobs):
        latent = 2 * (i + 1)
        specs.append({**base, "name": f"sweep-latent-{latent}",
                      "model": {**base["model"], "latent_dim": latent},
                      "training": {**base["training"], "epochs": epochs}})  # fmt: skip
    return specs


def run_sweep(stack: Stack, specs: list[dict[str, Any]]) -> dict[str, Any]:
    """Submit all, wait for all; the wall time and what the records say about the jobs."""
    posted = [stack.submit(spec) for spec in specs]
    first_post = posted[0][1]
    posting_s = time.time() - first_post
    waiting = {job_id for job_id, _ in posted}
    records: dict[str, dict[str, Any]] = {}
    while waiting:
        for job_id in sorted(waiting):
            record = stack.http.get(f"/v1/jobs/{job_id}").raise_for_status().json()
            if record["state"] in TERMINAL:
                if record["state"] != "succeeded":
                    raise JobFailed(record)
                records[job_id], last_seen = record, time.time()
                waiting.discard(job_id)
        time.sleep(0.05)
    metrics = [stack.result(job_id)["metrics"] for job_id in records]
    return {
        "wall": last_seen - first_post,
        "posting": posting_s,
        "in_epochs": sum(m["train_seconds"] for m in metrics),
        "start_seconds": sum(m["start_seconds"] for m in metrics),
        "fit_seconds": sum(m["fit_seconds"] for m in metrics),
        "most_at_once": most_running_at_once(list(records.values())),
    }


def most_running_at_once(records: list[dict[str, Any]]) -> int:
    """The most jobs whose started_at..finished_at overlapped at one moment."""
    events = []
    for record in records:
        events.append((datetime.fromisoformat(record["started_at"]), 1))
        events.append((datetime.fromisoformat(record["finished_at"]), -1))
    running = most = 0
    for _, change in sorted(events):  # an end sorts before a start at the same instant
        running += change
        most = max(most, running)
    return most


def wait_for_one_idle_group(stack: Stack, timeout_s: float = 180.0) -> float:
    """Wait until the sweep's extra group has been retired (AETRAIN_WARM_IDLE_S, 60 s), so
    that every sweep starts from the same stack: one warm group."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        info = stack.dispatcher()
        if info["running"] == 0 and info["idle_groups"] <= 1:
            break
        time.sleep(1.0)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3, help="sweeps and bare runs (medians)")
    parser.add_argument("--keep", action="store_true", help="keep the stack's temporary home")
    args = parser.parse_args()
    specs = sweep_specs(args.jobs, args.epochs)
    load1, _, _ = os.getloadavg()
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  {os.cpu_count()} CPUs, load average "
          f"{load1:.2f}, torch {version('torch')}, ray {version('ray')}", flush=True)  # fmt: skip
    sweeps, bares = [], []
    with running_stack(env={"AETRAIN_WARM_GROUPS": "1"}, keep=args.keep) as stack:
        print(f"aetrain up in {stack.home}; a throwaway job to have its group ready", flush=True)
        stack.submit_and_wait(load_example("digits-dense.yaml"))
        for i in range(args.runs):
            sweep = run_sweep(stack, specs)
            bare = run_bare(specs)
            sweeps.append(sweep)
            bare_s = bare["total"]
            bares.append((bare_s, bare["in_epochs"]))
            print(f"  run {i + 1}: service {sweep['wall']:.2f} s (POSTs took "
                  f"{sweep['posting']:.2f} s, at most {sweep['most_at_once']} jobs running at "
                  f"once, in epochs {sweep['in_epochs']:.2f} s, start_seconds "
                  f"{sweep['start_seconds']:.2f}, fit_seconds {sweep['fit_seconds']:.2f}); "
                  f"bare script {bare_s:.2f} s (in epochs {bares[-1][1]:.2f} s)",
                  flush=True)  # fmt: skip
            if i + 1 < args.runs:
                waited = wait_for_one_idle_group(stack)
                print(f"  (waited {waited:.0f} s for the second group's idle retirement)")
    service_s = statistics.median(s["wall"] for s in sweeps)
    bare_s = statistics.median(b for b, _ in bares)
    print(f"\n{args.jobs} digits jobs x {args.epochs} epochs (latent_dim 2..{2 * args.jobs}), "
          f"median of {args.runs}, seconds")  # fmt: skip
    print(f"{'setting':44s} {'wall':>8s} {'in epochs':>10s}")
    print(f"{'service, all submitted at once (warm stack)':44s} {service_s:8.2f} "
          f"{statistics.median(s['in_epochs'] for s in sweeps):10.2f}")  # fmt: skip
    print(f"{'bare script, one after another':44s} {bare_s:8.2f} "
          f"{statistics.median(e for _, e in bares):10.2f}")  # fmt: skip
    print(f"service / bare script: {service_s / bare_s:.2f}")


if __name__ == "__main__":
    main()

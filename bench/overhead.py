"""What a job costs beyond its training, on a warm stack, next to a bare script and a bare
Ray Train fit() of the same training (issue 10's targets).

    .venv/bin/python bench/overhead.py [--runs 5] [--only 1 2 stacked]

Starts one `aetrain up` (bench/stack.py; one one-worker group kept warm, and
AETRAIN_WARM_IDLE_S=600 so that a 2-worker group outlives a round of the others), runs a
throwaway job so that the group is ready, then, for the digits example on 1 worker and then
on 2 workers (examples/digits-dense*.yaml), one throwaway round and `--runs` rounds of:

  A  the job through the service: POST, then GET every 20 ms until `succeeded`. Submit ->
     first epoch is the first entry of the job's metrics stream (its id is Redis's clock in
     ms, taken as epoch 0 ends) minus the time the POST was sent; last epoch -> succeeded is
     the time the client saw `succeeded` minus the last entry's.
  B  the same training in a bare PyTorch script: fresh `python` processes (imports
     included; 2 workers: two processes and gloo DDP, as torchrun would start them), the
     same model, data split, seeds, loss, optimizer, batch size and epochs, validation every
     epoch as the service does, no checkpoints; wall time from outside.
  C  the same loop, reporting its metrics every epoch, as a plain Ray Train
     TorchTrainer.fit() in a fresh `python`: on the stack's Ray cluster for 1 worker (its
     warm group holds one of the 2 CPUs, one is free); on its own `ray.init()` local cluster
     for 2 workers (the stack's 2-worker group holds both CPUs between the jobs).
  D  C with RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.1, as the service's groups run (Ray's
     default 2 s poll holds up every ray.train.report()).

Then the stacked example (examples/stacked-digits.yaml, 3 layers + fine-tune: its baseline stage
left out) through the service `--runs` times,
against the sum of its stages' training time. Medians are printed; nothing is asserted.
Each bare process runs torch on one thread, as Ray runs a one-CPU worker.

`python bench/overhead.py bare SPECS RANK WORLD` and `... ray-fit SPEC ADDRESS POLL_S` are
the B, C and D processes (sweep.py runs `bare` too); their imports stay inside them, so that
a bare process imports only what a bare script would.
"""

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

TARGETS = {"ratio_1": 1.5, "ratio_2": 2.0, "first_epoch_s": 1.5, "stacked_factor": 1.3}
Report = Callable[[dict[str, float]], None]


# -- the training, as workers/train_loop.py does it without the service ---------------------------
def train_epochs(spec_doc: dict[str, Any], rank: int, world_size: int,
                 wrap: Callable[[Any], Any], report: Report) -> dict[str, float]:  # fmt: skip
    """Train an autoencoder spec's one stage on this rank; its validation metrics (rank 0)
    and the seconds spent in epochs. Seeds, data split, sharding, batch size, loss and
    optimizer are train_loop.train_stage's; `wrap` is DDP or Ray's prepare_model."""
    import numpy as np
    import torch
    from torch.utils.data import DistributedSampler, TensorDataset

    from shared.specs import parse_job_spec
    from workers.batches import IndexedBatches
    from workers.checkpoints import unwrap
    from workers.tasks import build_task, find_stage, init_seed

    def seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    spec = parse_job_spec(spec_doc)
    seed_everything(init_seed(spec))  # the same initial weights on every rank
    task = build_task(spec, find_stage(spec, "train"), {}, None)
    training = task.training
    seed_everything(training.seed + rank)
    train_set = [torch.from_numpy(a) for a in task.arrays]
    sampler: Any = DistributedSampler(TensorDataset(*train_set), num_replicas=world_size,
                                      rank=rank, shuffle=True, seed=training.seed)  # fmt: skip
    loader = IndexedBatches(train_set, sampler, max(1, training.batch_size // world_size),
                            torch.device("cpu"))  # fmt: skip
    model = wrap(task.model)
    # train_loop.make_optimizer's choice, copied: importing it would import Ray.
    params = [p for p in model.parameters() if p.requires_grad]
    if training.optimizer == "sgd":
        optimizer: Any = torch.optim.SGD(params, lr=training.lr, momentum=0.9,
                                         weight_decay=training.weight_decay)  # fmt: skip
    else:
        make = torch.optim.AdamW if training.optimizer == "adamw" else torch.optim.Adam
        optimizer = make(params, lr=training.lr, weight_decay=training.weight_decay)
    in_epochs, metrics, loop_start = 0.0, {}, time.time()
    for epoch in range(training.epochs):
        started = time.perf_counter()
        sampler.set_epoch(epoch)
        model.train()
        for batch in loader:
            loss: Any = task.loss(model, list(batch))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        seconds = time.perf_counter() - started  # as epoch_seconds: before the validation
        in_epochs += seconds
        metrics = {"train_loss": float(loss), "epoch_seconds": seconds, "in_epochs": in_epochs,
                   "loop_start": loop_start}  # fmt: skip
        if rank == 0:
            metrics.update(task.evaluate(unwrap(model)))
        report(metrics)
    return metrics


def bare_main(specs: list[dict[str, Any]], rank: int, world_size: int) -> None:
    """B: train each spec in turn; rank 0 prints what it took (see run_bare)."""
    import torch

    wrap: Callable[[Any], Any] = lambda model: model  # noqa: E731
    if world_size > 1:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        dist.init_process_group("gloo", rank=rank, world_size=world_size)  # MASTER_* from env
        wrap = DistributedDataParallel
    done = [train_epochs(spec, rank, world_size, wrap, lambda _: None) for spec in specs]
    if rank == 0:
        print(json.dumps({"in_epochs": sum(m["in_epochs"] for m in done),
                          "val_mse": [m["val_mse"] for m in done],
                          "loop_start": done[0]["loop_start"],
                          "threads": torch.get_num_threads()}))  # fmt: skip


def ray_fit_main(spec: dict[str, Any], address: str, health_check_s: str) -> None:
    """C: one plain TorchTrainer.fit() of the same loop; prints what it took (run_ray_fit)."""
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    workers = spec["resources"]["workers"]
    # Ray Train's controller collects each ray.train.report() when it polls its workers, every
    # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default): a report per epoch waits for it.
    env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": health_check_s} if health_check_s else {}
    if address == "local":
        ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env})  # fmt: skip
    else:
        ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": env})
    initialized = time.time()

    def loop(config: dict[str, Any]) -> None:
        ctx = ray.train.get_context()
        rank = ctx.get_world_rank()
        last = train_epochs(config["spec"], rank, ctx.get_world_size(),
                            ray.train.torch.prepare_model, ray.train.report)  # fmt: skip
        if rank == 0:  # V2's Result.metrics are those of its last checkpoint, and none is saved
            Path(config["out"]).write_text(json.dumps(last))

    with tempfile.TemporaryDirectory(prefix="bare-fit-") as storage:
        out = Path(storage) / "last.json"
        TorchTrainer(
            loop, train_loop_config={"spec": spec, "out": str(out)},
            scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name="bare-fit", storage_path=storage),
        ).fit()  # fmt: skip
        fitted = time.time()
        last = json.loads(out.read_text())
    print(json.dumps({"in_epochs": last["in_epochs"], "val_mse": [last["val_mse"]],
                      "loop_start": last["loop_start"], "initialized": initialized,
                      "fitted": fitted}))  # fmt: skip


# -- the bare runs, timed from outside ------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_bare(specs: list[dict[str, Any]], workers: int = 1, threads: int = 1) -> dict[str, Any]:
    """B: fresh bare processes (one per worker) train `specs` in turn. Seconds from the
    launch: to the end (total), to the first epoch's start (to_loop); and in epochs, val_mse."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}  # fmt: skip
    args = [sys.executable, str(BENCH / "overhead.py"), "bare", json.dumps(specs)]
    launched, started = time.time(), time.perf_counter()
    procs = [subprocess.Popen([*args, str(rank), str(workers)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(workers)]  # fmt: skip
    outputs = [proc.communicate() for proc in procs]
    total = time.perf_counter() - started
    got = _last_json("bare script", procs[0].returncode, *outputs[0])
    return {**got, "total": total, "to_loop": got["loop_start"] - launched}


def run_ray_fit(spec: dict[str, Any], address: str, health_check_s: str = "") -> dict[str, Any]:
    """C: a fresh python does one TorchTrainer.fit(). Seconds from the launch: to the end
    (total), past ray.init (to_init), to rank 0's first epoch (to_loop), to fit()'s return
    (to_fitted); and in epochs, val_mse."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # the stack's Ray wants its token
    env.pop("RAY_ADDRESS", None)
    launched, started = time.time(), time.perf_counter()
    run = subprocess.run([sys.executable, str(BENCH / "overhead.py"), "ray-fit",
                          json.dumps(spec), address, health_check_s], cwd=REPO, env=env,
                         capture_output=True, text=True)  # fmt: skip
    total = time.perf_counter() - started
    got = _last_json("Ray fit", run.returncode, run.stdout, run.stderr)
    marks = {f"to_{mark}": got[mark] - launched for mark in ("initialized", "fitted")}
    return {**got, **marks, "total": total, "to_loop": got["loop_start"] - launched}


def _last_json(what: str, code: int | None, out: str, err: str) -> dict[str, Any]:
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if code != 0 or not lines:
        raise RuntimeError(f"the {what} exited with {code}: {err[-2000:]}")
    found: dict[str, Any] = json.loads(lines[-1])
    return found


# -- the service ----------------------------------------------------------------------------------
def run_service(stack: Any, spec: dict[str, Any]) -> dict[str, float]:
    """A: one job on the warm stack, timed as the client and the metrics stream saw it."""
    from shared.redis_keys import Keys

    job_id, posted_at = stack.submit(spec)
    record, seen_at = stack.wait(job_id, poll_s=0.02)
    entries = stack.store.redis.xrange(Keys().metrics(job_id))
    metrics = stack.result(job_id)["metrics"]

    def clock(iso: str) -> float:
        return datetime.fromisoformat(iso).timestamp()

    def entry_at(entry: tuple[str, dict[str, str]]) -> float:
        return int(entry[0].split("-")[0]) / 1000  # a stream id is "<ms>-<seq>"

    # Each stage's first and last metrics entries (an entry is written as its epoch ends).
    epochs: dict[str, list[float]] = {}
    for entry in entries:
        epochs.setdefault(entry[1]["stage"], []).append(entry_at(entry))
    stages = record["stages"]
    started = [clock(stage["started_at"]) for stage in stages]
    finished = [clock(stage["finished_at"]) for stage in stages]
    first = [epochs[stage["name"]][0] for stage in stages]
    last = [epochs[stage["name"]][-1] for stage in stages]
    return {
        "total": seen_at - posted_at,
        "first_epoch": entry_at(entries[0]) - posted_at,
        "last_to_done": seen_at - entry_at(entries[-1]),
        # Where the time goes, in order (the record's times are the dispatcher's clock); sums
        # over the stages, which run one after another here.
        "to_claimed": clock(record["started_at"]) - posted_at,
        "claimed_to_stage": started[0] - clock(record["started_at"]),
        "stage_to_first_epoch": sum(f - s for s, f in zip(started, first, strict=True)),
        "first_to_last_epoch": sum(b - a for a, b in zip(first, last, strict=True)),
        "last_epoch_to_stage_end": sum(f - e for e, f in zip(last, finished, strict=True)),
        "between_stages": sum(b - a for a, b in zip(finished, started[1:], strict=False)),
        "stage_end_to_finished": clock(record["finished_at"]) - finished[-1],
        "finished_to_seen": seen_at - clock(record["finished_at"]),
        "in_epochs": metrics["train_seconds"],
        "start_seconds": metrics["start_seconds"],
        "fit_seconds": metrics["fit_seconds"],
        "stages": len(record["stages"]),
        "val_mse": metrics.get("val_mse") or float("nan"),
    }


def load_example(name: str) -> dict[str, Any]:
    import yaml

    doc: dict[str, Any] = yaml.safe_load((REPO / "examples" / name).read_text())
    return doc


def med(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def spread(runs: list[dict[str, float]], key: str) -> str:
    values = [run[key] for run in runs]
    return f"{statistics.median(values):6.2f} ({min(values):.2f}-{max(values):.2f})"


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


SETTINGS = {
    "A": "service (warm group)",
    "B": "bare script",
    "C": "bare Ray Train fit()",
    "D": "  the same, 0.1 s poll",  # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, as the service's groups
}
PHASES = ["to_claimed", "claimed_to_stage", "stage_to_first_epoch", "first_to_last_epoch",
          "last_epoch_to_stage_end", "between_stages", "stage_end_to_finished",
          "finished_to_seen"]  # fmt: skip


def series(stack: Any, spec: dict[str, Any], runs: int, ray_address: str
           ) -> dict[str, list[dict[str, float]]]:  # fmt: skip
    """A, B, C, D in turn, `runs` times, after one throwaway round (its group, caches)."""
    workers = spec["resources"]["workers"]
    got: dict[str, list[dict[str, float]]] = {key: [] for key in SETTINGS}
    for i in range(runs + 1):
        a = run_service(stack, spec)
        b = run_bare([spec], workers)
        c = run_ray_fit(spec, ray_address)
        d = run_ray_fit(spec, ray_address, health_check_s="0.1")
        fits = "; ".join(
            f"{name.strip()} {fit['total']:.2f} s (ray.init done at {fit['to_initialized']:.2f}, "
            f"loop from {fit['to_loop']:.2f}, fit() returned at {fit['to_fitted']:.2f})"
            for name, fit in ((SETTINGS["C"], c), (SETTINGS["D"], d))
        )
        print(f"  {'warm-up' if i == 0 else f'run {i}'}: service {a['total']:.2f} s (first "
              f"epoch at {a['first_epoch']:.2f}); bare script {b['total']:.2f} s (loop from "
              f"{b['to_loop']:.2f}); {fits}; val_mse {a['val_mse']:.5f} / "
              f"{b['val_mse'][0]:.5f} / {c['val_mse'][0]:.5f} / {d['val_mse'][0]:.5f}",
              flush=True)  # fmt: skip
        if i == 0:
            continue
        got["A"].append(a)
        for key, run in (("B", b), ("C", c), ("D", d)):
            got[key].append({k: v for k, v in run.items() if isinstance(v, float)})
    return got


def print_series(results: dict[int, dict[str, list[dict[str, float]]]], runs: int) -> None:
    print(f"\nmedian (min-max) of {runs}, seconds")
    print(f"{'setting':36s} {'total':>19s} {'in epochs':>9s} {'submit->1st epoch':>18s} "
          f"{'last epoch->succeeded':>22s}")  # fmt: skip
    for workers, got in results.items():
        for key, name in SETTINGS.items():
            runs_, is_a = got[key], key == "A"
            print(f"{f'{workers} worker(s): {name}':36s} {spread(runs_, 'total'):>19s} "
                  f"{med(runs_, 'in_epochs'):9.2f} "
                  f"{spread(runs_, 'first_epoch') if is_a else '-':>18s} "
                  f"{spread(runs_, 'last_to_done') if is_a else '-':>22s}")  # fmt: skip
    print(f"\n{'figure (medians)':56s} {'measured':>9s} {'target':>8s}  met")
    for workers, got in results.items():
        a = med(got["A"], "total")
        ratio, target = a / med(got["B"], "total"), TARGETS[f"ratio_{workers}"]
        print(f"{f'{workers} worker(s): service / bare script':56s} {ratio:9.2f} "
              f"{f'<= {target}':>8s}  {met(ratio <= target)}")  # fmt: skip
        for key in ("C", "D"):
            name = f"{workers} worker(s): service / {SETTINGS[key].strip()}"
            print(f"{name:56s} {a / med(got[key], 'total'):9.2f} {'-':>8s}")
        first = med(got["A"], "first_epoch")
        print(f"{f'{workers} worker(s): submit -> first epoch, s':56s} {first:9.2f} "
              f"{'<= 1.5':>8s}  {met(first <= TARGETS['first_epoch_s'])}")  # fmt: skip
    print("\nwhere the time goes (medians, s)")
    for workers, got in results.items():
        jobs = got["A"]
        phases = ", ".join(f"{phase} {med(jobs, phase):.2f}" for phase in PHASES)
        print(f"  {workers} worker(s), service: {phases}; start_seconds "
              f"{med(jobs, 'start_seconds'):.2f}, fit_seconds {med(jobs, 'fit_seconds'):.2f}, "
              f"train_seconds {med(jobs, 'in_epochs'):.2f}")  # fmt: skip
        print(f"  {workers} worker(s), bare script: first epoch starts at "
              f"{med(got['B'], 'to_loop'):.2f} (imports, data, model)")  # fmt: skip
        for key in ("C", "D"):
            fit = got[key]
            print(f"  {workers} worker(s), {SETTINGS[key].strip()}: ray.init done at "
                  f"{med(fit, 'to_initialized'):.2f}, first epoch at {med(fit, 'to_loop'):.2f}, "
                  f"fit() returned at {med(fit, 'to_fitted'):.2f}, exit at "
                  f"{med(fit, 'total'):.2f}")  # fmt: skip


def run_stacked(stack: Any, runs: int) -> list[dict[str, float]]:
    # The chain the target names (3 layers + fine-tune): the example's baseline stage trains
    # beside it on a group of its own, and would count its epochs in the sum while they
    # overlap the chain's.
    spec = {**load_example("stacked-digits.yaml"), "baseline": False}
    print(f"stacked example (examples/stacked-digits.yaml) without its baseline stage, {runs} "
          "runs", flush=True)  # fmt: skip
    got = []
    for i in range(runs):
        run = run_service(stack, spec)
        got.append(run)
        print(f"  run {i + 1}: total {run['total']:.2f} s, {run['stages']} stages, in epochs "
              f"{run['in_epochs']:.2f} s, start_seconds {run['start_seconds']:.2f}, "
              f"fit_seconds {run['fit_seconds']:.2f}", flush=True)  # fmt: skip
    return got


def print_stacked(got: list[dict[str, float]], fixed_s: float | None) -> None:
    total, train = med(got, "total"), med(got, "in_epochs")
    phases = ", ".join(f"{phase} {med(got, phase):.2f}" for phase in PHASES)
    print(f"\nstacked example, where the time goes (medians, s): {phases}")
    print(
        f"stacked example, median of {len(got)}: total {total:.2f} s; sum of its stages' "
        f"training time (train_seconds) {train:.2f} s; start_seconds "
        f"{med(got, 'start_seconds'):.2f}; fit_seconds {med(got, 'fit_seconds'):.2f}"
    )
    if fixed_s is None:
        print("target: needs the 1-worker series for one job's fixed cost (--only 1 stacked)")
        return
    bound = TARGETS["stacked_factor"] * train + fixed_s
    print(f"target: total <= 1.3 x {train:.2f} + {fixed_s:.2f} (one job's fixed cost: the "
          f"1-worker job's total - train_seconds) = {bound:.2f} s: {total:.2f} s, "
          f"{met(total <= bound)}")  # fmt: skip


def bench(args: argparse.Namespace) -> None:
    from stack import running_stack

    load1, _, _ = os.getloadavg()
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  {os.cpu_count()} CPUs, load average "
          f"{load1:.2f}, torch {version('torch')}, ray {version('ray')}", flush=True)  # fmt: skip
    one = load_example("digits-dense.yaml")
    results: dict[int, dict[str, list[dict[str, float]]]] = {}
    stacked: list[dict[str, float]] = []
    # A 2-worker group is not kept warm (only one-worker groups are): it stays warm only while
    # the next 2-worker job comes within AETRAIN_WARM_IDLE_S, and a round of B, C and D takes
    # longer than the default 60 s.
    env = {"AETRAIN_WARM_GROUPS": "1", "AETRAIN_WARM_IDLE_S": str(args.warm_idle_s)}
    with running_stack(env=env, keep=args.keep) as stack:
        print(f"aetrain up in {stack.home}; a throwaway job to have its group ready", flush=True)
        stack.submit_and_wait(one)
        fixed_s = None
        if "1" in args.only:
            print("1 worker (examples/digits-dense.yaml), C on the stack's Ray", flush=True)
            results[1] = series(stack, one, args.runs, stack.ray_address())
            fixed_s = statistics.median(a["total"] - a["in_epochs"] for a in results[1]["A"])
        if "2" in args.only:
            print("2 workers (examples/digits-dense-ddp.yaml), C on its own local Ray",
                  flush=True)  # fmt: skip
            results[2] = series(stack, load_example("digits-dense-ddp.yaml"), args.runs, "local")
        if "stacked" in args.only:
            if "2" in args.only:  # its group holds both CPUs: warm a one-worker group again
                stack.submit_and_wait(one)
            stacked = run_stacked(stack, args.runs)
    if results:
        print_series(results, args.runs)
    if stacked:
        print_stacked(stacked, fixed_s)


def main() -> None:
    if sys.argv[1:2] == ["bare"]:
        bare_main(json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
        return
    if sys.argv[1:2] == ["ray-fit"]:
        ray_fit_main(json.loads(sys.argv[2]), sys.argv[3], sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each setting (medians)")
    parser.add_argument("--only", nargs="+", default=["1", "2", "stacked"],
                        choices=["1", "2", "stacked"])  # fmt: skip
    parser.add_argument("--warm-idle-s", type=float, default=600.0,
                        help="AETRAIN_WARM_IDLE_S of the stack")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the stack's temporary home")
    bench(parser.parse_args())


if __name__ == "__main__":
    main()

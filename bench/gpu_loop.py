"""The service's train loop against a bare loop on one device, in samples/s (issue 10).

    torchrun --standalone --nproc_per_node=1 bench/gpu_loop.py [--epochs N] [--batch-size B]

bench/gpu_check.sh runs it (once, and with 2 processes where there are 2+ GPUs). Every rank
trains the digits example (tests/specs.py digits_spec) three ways, one after the other:

    (a) service    workers.train_loop.train_stage as a warm group's rank runs it, without Ray
                   or Redis (store and channel None: no metrics, no lease check): its batches
                   (workers/batches.py) taken by index from the training set, copied to the
                   device once; one checkpoint (at the end) written to a temporary folder
    (b) bare fp32  the same model, initial weights, optimizer and loss; the whole training set
                   one tensor on the device, batches taken by a shuffled index tensor
    (c) bare bf16  (b) under torch.autocast(bfloat16)

and rank 0 prints samples/s of each and the ratios (a)/(b) and (c)/(b). On a GPU the defaults
are 300 epochs of global batches of 512: digits has 1,437 training samples, and a step of the
example's 128 times little but kernel launches. On a CPU, 20 epochs of 128 (the example's).
CPU figures show that the script works; they are not the GPU check.

Needs torch, numpy, pydantic, scikit-learn and redis (the client library), what
workers.train_loop imports; not Ray and not a Redis server.
"""

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # torchrun puts bench/ on the path, not the repository

# import name -> pip's name. Checked before importing anything, so a bare GPU machine gets
# one line naming all it lacks rather than a traceback about the first. redis is the client
# library only: workers.train_loop and shared.store import it; no server is contacted.
REQUIRED = {
    "torch": "torch",
    "numpy": "numpy",
    "pydantic": "pydantic",
    "sklearn": "scikit-learn",
    "redis": "redis",
}
MISSING = [pip for name, pip in REQUIRED.items() if importlib.util.find_spec(name) is None]
if MISSING:
    sys.exit(f"gpu_loop.py: missing Python packages: {' '.join(MISSING)} "
             f"(pip install {' '.join(MISSING)})")  # fmt: skip

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

try:  # anything else the service's modules import is named, not a traceback
    from shared.group_channel import StageOutcome, StageTask  # noqa: E402
    from shared.specs import AutoencoderSpec, parse_job_spec  # noqa: E402
    from shared.stages import plan_stages  # noqa: E402
    from tests.specs import digits_spec  # noqa: E402
    from workers.losses import reconstruction_loss  # noqa: E402
    from workers.tasks import Task, build_task, init_seed, job_split  # noqa: E402
    from workers.train_loop import make_optimizer, seed_everything, train_stage  # noqa: E402
except ImportError as error:
    ours = (error.name or "").split(".")[0] in ("shared", "workers", "tests")
    hint = "" if ours else f" (pip install {error.name})"
    sys.exit(f"gpu_loop.py: the service's train loop cannot be imported: {error}{hint}")

GPU_EPOCHS, GPU_BATCH = 300, 512
CPU_EPOCHS, CPU_BATCH = 20, 128


@dataclass
class Figure:
    label: str
    samples: int  # samples trained on, all ranks together
    seconds: float  # of training alone
    val_mse: float | None
    note: str = ""

    @property
    def per_second(self) -> float:
        return self.samples / self.seconds


class Bench:
    """One rank's view: its device, its peers, and the stage all three loops train."""

    def __init__(self, rank: int, world_size: int, device: torch.device, spec_doc: dict[str, Any]):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.spec_doc = spec_doc
        spec = parse_job_spec(spec_doc)
        assert isinstance(spec, AutoencoderSpec)  # the digits example: one autoencoder stage
        self.spec = spec
        self.stage = plan_stages(self.spec)[0]
        split = job_split(self.spec, None)
        self.n_train = len(split.x_train)
        self.x_val = torch.from_numpy(split.x_val).to(device)

    def say(self, line: str) -> None:
        print(f"[rank {self.rank}] {line}", flush=True)

    def prepare(self, model: nn.Module) -> nn.Module:
        """What Ray's prepare_model does: onto this rank's device, DDP when it has peers."""
        model = model.to(self.device)
        if self.world_size == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def fresh(self) -> Task:
        """The stage's model and data as train_stage builds them: the same weights every time."""
        seed_everything(init_seed(self.spec))
        return build_task(self.spec, self.stage, {}, None)

    def service(self) -> tuple[Figure | None, str]:
        """(a): the figure, or None and why train_stage failed."""
        with tempfile.TemporaryDirectory(prefix="aetrain-gpu-check-") as tmp:
            dist.barrier()
            started = time.perf_counter()
            task = StageTask(seq=1, job_id="gpu-check", token=1, stage=self.stage.name,
                             spec=self.spec_doc, inputs={}, run_folder=f"{tmp}/run",
                             datasets_root=tmp, log_path=f"{tmp}/log", metrics_cap=100,
                             max_failures=0, submitted_at=time.time())  # fmt: skip
            try:
                outcome: StageOutcome = train_stage(task, self.rank, self.world_size, self.device,
                                                    self.prepare, None, None, self.say)  # fmt: skip
            except Exception as error:  # reported, and the bare loops still measured
                seconds = time.perf_counter() - started
                # Where it raised after the last epoch (the final evaluation), this bounds
                # the loop's speed from below: the run is rarely worth repeating for it.
                bound = self.n_train * self.spec.training.epochs / seconds
                return None, (
                    f"raised after {seconds:.2f} s (if after the last epoch: "
                    f">= {bound:,.0f} samples/s): {type(error).__name__}: {error}"
                )
            whole = time.perf_counter() - started
        if outcome.error or outcome.stopped or outcome.lease_lost:
            return None, f"ended without training to the end: {outcome}"
        val_mse = outcome.result.get("val_mse")
        # fit - start: the epochs, the one checkpoint and the final evaluation; not building
        # the data and model, which the whole call (printed too) includes.
        seconds = outcome.fit_seconds - outcome.start_seconds
        samples = self.n_train * self.spec.training.epochs
        note = f"whole call {whole:.2f} s with data and model"
        return Figure("(a) service loop", samples, seconds, val_mse, note), ""

    def bare(self, bf16: bool, epochs: int | None = None) -> Figure:
        """(b) or (c): every rank trains on its shard of each epoch's permutation."""
        built = self.fresh()
        training = built.training
        model = self.prepare(built.model)
        optimizer = make_optimizer(model, training.optimizer, training.lr, training.weight_decay)
        x = torch.from_numpy(built.arrays[0]).to(self.device)
        per_rank = max(1, training.batch_size // self.world_size)
        shard = len(x) // self.world_size  # equal shards: DDP ranks must take as many steps
        order_gen = torch.Generator(device=self.device).manual_seed(training.seed)
        epochs = epochs or training.epochs
        dist.barrier()
        started = time.perf_counter()
        model.train()
        for _ in range(epochs):
            # The same permutation on every rank (same seed), each taking its own slice.
            order = torch.randperm(len(x), device=self.device, generator=order_gen)
            mine = order[self.rank * shard : (self.rank + 1) * shard]
            for first in range(0, shard, per_rank):
                xb = x[mine[first : first + per_rank]]
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                    x_hat, _ = model(xb)
                loss = reconstruction_loss(x_hat.float(), xb, self.spec.objective.loss)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]  # torch's stub
                optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # stop the clock when the GPU is done
        seconds = time.perf_counter() - started
        model.eval()
        with torch.no_grad():  # fp32, as the service evaluates
            val_mse = float(torch.mean((model(self.x_val)[0] - self.x_val) ** 2))
        label = "(c) bare bf16 autocast" if bf16 else "(b) bare fp32"
        return Figure(label, shard * self.world_size * epochs, seconds, val_mse)


def describe(device: torch.device, world_size: int) -> list[str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        where = (f"{name} ({device}); CUDA used: yes (CUDA {torch.version.cuda}, "
                 f"bf16 supported: {torch.cuda.is_bf16_supported()})")  # fmt: skip
    else:
        where = f"CPU ({torch.get_num_threads()} torch threads); CUDA used: no"
    backend = "nccl" if device.type == "cuda" else "gloo"
    return [
        f"device: {where}",
        f"torch {torch.__version__}; {world_size} process(es), {backend}; fp32 matmul "
        f"precision {torch.get_float32_matmul_precision()!r}",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--epochs", type=int, default=None,
        help=f"default {GPU_EPOCHS} on a GPU, {CPU_EPOCHS} on a CPU",
    )  # fmt: skip
    parser.add_argument(
        "--batch-size", type=int, default=None,
        help=f"global; default {GPU_BATCH} on a GPU, {CPU_BATCH} on a CPU",
    )  # fmt: skip
    parser.add_argument(
        "--check-imports", action="store_true",
        help="only check that everything imports (gpu_check.sh, before torchrun)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.check_imports:  # the imports above ran: nothing is missing
        print(f"imports: ok (torch {torch.__version__})")
        return 0

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if "MASTER_ADDR" not in os.environ:  # run as plain python: a group of one all the same
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world_size)
    try:
        epochs = args.epochs or (GPU_EPOCHS if cuda else CPU_EPOCHS)
        batch_size = args.batch_size or (GPU_BATCH if cuda else CPU_BATCH)
        return run(Bench(rank, world_size, device,
                         digits_spec(epochs=epochs, workers=world_size, batch_size=batch_size,
                                     checkpoint_every=epochs)))  # fmt: skip
    finally:
        dist.destroy_process_group()


def run(bench: Bench) -> int:
    def report(line: str) -> None:
        if bench.rank == 0:
            print(line, flush=True)

    training = bench.spec.training
    for line in describe(bench.device, bench.world_size):
        report(line)
    report(f"work: digits, {bench.n_train} training samples; {bench.spec_doc['model']}; "
           f"{training.optimizer} lr {training.lr}; {training.epochs} epochs of global batches "
           f"of {training.batch_size}; (a) writes one checkpoint, at the end")  # fmt: skip
    if bench.device.type != "cuda":
        report("NOTE: no CUDA here: CPU figures only show that the check runs; "
               "they are not the GPU check.")  # fmt: skip

    # Warm-up, untimed: CUDA context, cuBLAS handles, the allocator, autocast's kernels.
    bench.bare(bf16=False, epochs=2)
    bench.bare(bf16=True, epochs=2)

    service, failure = bench.service()
    figures = [bench.bare(bf16=False), bench.bare(bf16=True)]
    base = figures[0]
    for fig in ([service] if service else []) + figures:
        mse = "n/a" if fig.val_mse is None else f"{fig.val_mse:.4f}"
        note = f"; {fig.note}" if fig.note else ""
        report(f"{fig.label:<24} {fig.per_second:>12,.0f} samples/s  ({fig.samples:,} samples "
               f"in {fig.seconds:.2f} s; val_mse {mse}{note})")  # fmt: skip
    if service is None:
        report(f"(a) service loop         FAILED: {failure}")
        report("(a)/(b) = n/a")
    else:
        report(f"(a)/(b) = {service.per_second / base.per_second:.2f}  "
               "(the service's loop against the bare fp32 loop)")  # fmt: skip
    report(f"(c)/(b) = {figures[1].per_second / base.per_second:.2f}  "
           "(bf16 autocast against fp32, both bare)")  # fmt: skip
    if bench.device.type != "cuda":
        report("NOTE: CPU figures: not the GPU check.")
    return 0 if service is not None else 1


if __name__ == "__main__":
    sys.exit(main())

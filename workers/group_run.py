"""What Ray Train's controller unpickles of a warm group's run: kept free of torch.

The controller is an actor process of its own. It unpickles the run's context, its callbacks
and their backend config, importing their modules, and never touches a tensor. Ray Train's
`TorchConfig` lives in a module that imports torch, so every group's controller imported
torch: 1.3 CPU-s and ~1 s of each group's start on 2 cores (bench/cold_start.py).
`ProcessGroupConfig` sets up the ranks' torch process group as `TorchConfig` does with its
default "env" method (Ray Train's `_TorchBackend.on_start` and `on_shutdown`, gloo or nccl),
from the controller, with each step that needs torch run on the ranks by Ray Train's own
functions, imported there. The ranks import torch anyway.
"""

import logging
import os
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import ray
from ray._private.ray_constants import env_integer
from ray.exceptions import GetTimeoutError
from ray.train._internal.base_worker_group import BaseWorkerGroup
from ray.train._internal.utils import get_address_and_port
from ray.train.backend import Backend, BackendConfig
from ray.train.constants import (
    DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
    TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
)
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.execution.worker_group.worker import Worker
from ray.train.v2._internal.execution.worker_group.worker_group import WorkerGroup
from ray.train.v2._internal.util import TrainingFramework

log = logging.getLogger("aetrain.groups")


def group_loop_entry(config: dict[str, Any]) -> None:
    """What each rank runs (workers/group_loop.py), imported on the rank only."""
    from workers.group_loop import group_loop_per_worker

    group_loop_per_worker(config)


# -- the process group ------------------------------------------------------------------------
@dataclass
class ProcessGroupConfig(BackendConfig):
    """`TorchConfig(backend=..., timeout_s=...)` with init_method "env", torch-free."""

    backend: str = "gloo"  # nccl when the ranks have GPUs
    timeout_s: int = 1800

    @property
    def backend_cls(self) -> type["ProcessGroupBackend"]:
        return ProcessGroupBackend

    @property
    def train_func_context(self) -> type["CudaDeviceOfRank"]:
        return CudaDeviceOfRank

    @property
    def framework(self) -> TrainingFramework:
        return TrainingFramework.TORCH

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}


class ProcessGroupBackend(Backend):
    share_cuda_visible_devices: bool = True

    def on_start(self, worker_group: BaseWorkerGroup, backend_config: BackendConfig) -> None:
        assert isinstance(backend_config, ProcessGroupConfig)
        address, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_set_master, address=address, port=port)
        worker_group.execute(_set_distributed_environment)
        ray.get([
            worker_group.execute_single_async(
                rank, _join_process_group, backend=backend_config.backend, world_rank=rank,
                world_size=len(worker_group), timeout_s=backend_config.timeout_s,
            )
            for rank in range(len(worker_group))
        ])  # fmt: skip

    def on_shutdown(self, worker_group: BaseWorkerGroup, backend_config: BackendConfig) -> None:
        leaving = worker_group.execute_async(_leave_process_group, len(worker_group) > 1)
        timeout_s = env_integer(
            TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S
        )
        try:
            ray.get(leaving, timeout=timeout_s)
        except GetTimeoutError:
            log.warning("the ranks' process group did not shut down in %d s", timeout_s)


class CudaDeviceOfRank:
    """Each rank's default CUDA device, set around its train function (TorchConfig's)."""

    def __enter__(self) -> None:
        from ray.train.torch.config import TorchConfigContextManager

        TorchConfigContextManager().__enter__()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return False


# Run on the ranks, which import torch anyway.
def _set_master(address: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = address
    os.environ["MASTER_PORT"] = str(port)


def _set_distributed_environment() -> None:
    from ray.train.torch.config import _set_torch_distributed_env_vars

    _set_torch_distributed_env_vars()


def _join_process_group(backend: str, world_rank: int, world_size: int, timeout_s: int) -> None:
    from ray.train.torch.config import _setup_torch_process_group

    _setup_torch_process_group(backend, world_rank, world_size, "env://", timeout_s)


def _leave_process_group(destroy: bool) -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy)


# -- without Ray Datasets ---------------------------------------------------------------------
class NoDatasets:
    """The dataset shard provider of a run without Ray Datasets: each stage builds its own."""

    def get_dataset_shard(self, dataset_info: Any) -> Any:
        raise KeyError("a warm group's run has no Ray Datasets")


class WithoutDatasetsCallback(DatasetsCallback):
    """Ray Train starts a DatasetManager actor (one more process, ~1.5 s of CPU on 2 cores)
    for every worker group and sends each rank Ray Data's context, datasets or not."""

    def before_init_train_context(self, workers: list[Worker]) -> dict[str, list[Any]]:
        return {"dataset_shard_provider": [NoDatasets()] * len(workers)}

    def after_worker_group_start(self, worker_group: WorkerGroup) -> None:
        pass

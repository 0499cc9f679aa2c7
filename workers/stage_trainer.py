"""The TorchTrainer a warm group runs, trimmed of what a group of ours never uses.

Ray Train's controller is an actor process of its own: it unpickles the trainer's callbacks
and the train function, importing their modules. This module is all it imports of ours, so
it stays light (the ranks import the models, the data and scikit-learn, the controller and the
group's driver do not).
"""

from typing import Any

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import (
    PlacementGroupCleanerCallback,
)
from ray.train.v2._internal.execution.worker_group.worker import Worker
from ray.train.v2._internal.execution.worker_group.worker_group import WorkerGroup


def group_loop_entry(config: dict[str, Any]) -> None:
    """What each rank runs (workers/group_loop.py), imported on the rank only."""
    from workers.group_loop import group_loop_per_worker

    group_loop_per_worker(config)


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


class StageTrainer(TorchTrainer):
    """TorchTrainer without Ray's PlacementGroupCleaner and DatasetManager.

    The cleaner is a detached actor that removes a run's placement group if its controller
    dies; here the whole Ray job dies with the group's driver and takes its placement groups
    with it. Without a dashboard the cleaner cannot reach the state API, and stopping it
    waited ~12 s at the end of every run. The DatasetManager serves Ray Datasets, which a
    stage does not use.
    """

    def _create_default_callbacks(self) -> list[Any]:
        callbacks: list[Any] = []
        for callback in super()._create_default_callbacks():
            if isinstance(callback, PlacementGroupCleanerCallback):
                continue
            if type(callback) is DatasetsCallback:
                callback = WithoutDatasetsCallback(self.train_run_context, datasets={})
            callbacks.append(callback)
        return callbacks

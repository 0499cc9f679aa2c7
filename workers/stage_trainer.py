"""The TorchTrainer a warm group runs, trimmed of what a group of ours never uses.

Only the group's driver imports this module (it imports torch, through `ray.train.torch`);
what Ray Train's controller unpickles of the run is in group_run.py.
"""

from typing import Any

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import (
    PlacementGroupCleanerCallback,
)

from workers.group_run import WithoutDatasetsCallback


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

"""A rank's training batches, taken from whole tensors by index, on the device when they fit.

`DataLoader(TensorDataset, sampler=DistributedSampler)` collates a batch sample by sample on
the host and copies it to the device at every step. For the small, in-memory training sets a
stage trains on, that was most of a step: on an H200 the train loop ran at 0.40 of a bare
loop with the data on the device (docs/benchmarks.md, GPU check). Here the sampler still
decides every rank's order, so the batches are exactly the DataLoader's, but a batch is one
indexing of each tensor, and the tensors are copied to the device once, when they fit
(`DEVICE_COPY_MAX_BYTES`, and a quarter of the device's free memory).
"""

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DistributedSampler

Sampler = DistributedSampler[tuple[torch.Tensor, ...]]  # over a TensorDataset of the tensors

# A training set larger than this stays in host memory and is copied a batch at a time.
DEVICE_COPY_MAX_BYTES = 4 << 30


class IndexedBatches:
    """Iterable over one epoch's batches of `tensors`, in the order `sampler` gives."""

    def __init__(
        self, tensors: Sequence[torch.Tensor], sampler: Sampler, batch_size: int,
        device: torch.device,
    ) -> None:  # fmt: skip
        self.sampler, self.batch_size, self.device = sampler, batch_size, device
        self.on_device = device.type == "cpu" or fits_on_device(tensors, device)
        self.tensors = [t.to(device) for t in tensors] if self.on_device else list(tensors)

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        order = torch.tensor(list(self.sampler), dtype=torch.long)
        if self.on_device:
            order = order.to(self.device)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            yield [t[index].to(self.device, non_blocking=True) for t in self.tensors]


def fits_on_device(tensors: Sequence[torch.Tensor], device: torch.device) -> bool:
    size = sum(t.numel() * t.element_size() for t in tensors)
    if size > DEVICE_COPY_MAX_BYTES:
        return False
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return size <= free // 4
    return True

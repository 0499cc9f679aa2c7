"""A rank's batches by index are the DataLoader's batches over the same sampler, exactly."""

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from workers import batches
from workers.batches import IndexedBatches

pytestmark = pytest.mark.timeout(60)


def training_set(n: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(n)
    return [torch.rand(n, 5, generator=generator), torch.randint(0, 10, (n,), generator=generator)]


@pytest.mark.parametrize(("n", "world_size", "batch_size"), [(37, 1, 8), (37, 2, 5), (10, 3, 4),
                                                              (5, 1, 128)])  # fmt: skip
def test_batches_by_index_are_the_data_loaders_batches(
    n: int, world_size: int, batch_size: int
) -> None:
    tensors = training_set(n)
    for rank in range(world_size):
        ours_sampler, theirs_sampler = (
            DistributedSampler(
                TensorDataset(*tensors), num_replicas=world_size, rank=rank, shuffle=True, seed=7
            )  # fmt: skip
            for _ in range(2)
        )
        ours = IndexedBatches(tensors, ours_sampler, batch_size, torch.device("cpu"))
        theirs = DataLoader(TensorDataset(*tensors), batch_size=batch_size, sampler=theirs_sampler)
        orders = []
        for epoch in range(3):
            ours_sampler.set_epoch(epoch)
            theirs_sampler.set_epoch(epoch)
            got, want = list(ours), list(theirs)
            assert len(got) == len(want) == len(ours)
            for mine, loaders in zip(got, want, strict=True):
                assert [t.dtype for t in mine] == [t.dtype for t in loaders]
                for a, b in zip(mine, loaders, strict=True):
                    assert torch.equal(a, b)
            orders.append(torch.cat([b[1] for b in got]))
        if n > 5:
            assert not torch.equal(orders[0], orders[1])  # set_epoch reshuffles


def test_a_training_set_over_the_cap_stays_where_it_is_and_is_batched_alike(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tensors = training_set(20)
    monkeypatch.setattr(batches, "DEVICE_COPY_MAX_BYTES", 100)
    assert not batches.fits_on_device(tensors, torch.device("meta"))
    sampler = DistributedSampler(TensorDataset(*tensors), num_replicas=1, rank=0, seed=1)
    # On the meta device nothing is computed: the batches are the host tensors, moved as each
    # is taken, so their shapes are all there is to see.
    kept = IndexedBatches(tensors, sampler, 6, torch.device("meta"))
    assert not kept.on_device and kept.tensors[0].device.type == "cpu"
    shapes = [tuple(t.shape for t in batch) for batch in kept]
    assert shapes == [((6, 5), (6,))] * 3 + [((2, 5), (2,))]
    assert all(t.device.type == "meta" for batch in kept for t in batch)

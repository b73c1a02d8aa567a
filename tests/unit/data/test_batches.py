"""regfit.data.batches: the train/validation split, shuffled and sharded epoch orders, batches."""

from __future__ import annotations

import pytest
import torch

from regfit.data import TensorBatches, split_indices


def test_split_indices_disjoint_covering_and_seeded() -> None:
    train, val = split_indices(100, 17, seed=0)
    assert (len(train), len(val)) == (83, 17)
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(100))
    again_train, again_val = split_indices(100, 17, seed=0)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    assert not torch.equal(val, split_indices(100, 17, seed=1)[1])


def _epoch(batches: TensorBatches) -> tuple[torch.Tensor, list[int]]:
    xs, sizes = [], []
    for x, y in batches:
        assert torch.equal(x.long(), y)  # pairs stay together
        xs.append(y)
        sizes.append(len(y))
    return torch.cat(xs), sizes


def test_batches_cover_every_sample_once_and_reshuffle() -> None:
    x, y = torch.arange(103).float(), torch.arange(103)
    batches = TensorBatches(x, y, batch_size=10, shuffle=True, seed=0)
    assert len(batches) == 11
    first, sizes = _epoch(batches)
    second, _ = _epoch(batches)
    assert sizes == [10] * 10 + [3]
    assert torch.equal(first.sort().values, y) and torch.equal(second.sort().values, y)
    assert not torch.equal(first, second)


def test_set_epoch_reproduces_an_epoch_order() -> None:
    x, y = torch.arange(50).float(), torch.arange(50)
    a = TensorBatches(x, y, batch_size=8, shuffle=True, seed=1)
    b = TensorBatches(x, y, batch_size=8, shuffle=True, seed=1)
    a.sampler.set_epoch(3)
    b.sampler.set_epoch(3)
    assert torch.equal(_epoch(a)[0], _epoch(b)[0])  # a fresh loader (e.g. after resume) agrees


def test_drop_last() -> None:
    x, y = torch.arange(103).float(), torch.arange(103)
    batches = TensorBatches(x, y, batch_size=10, shuffle=True, drop_last=True)
    assert len(batches) == 10
    seen, sizes = _epoch(batches)
    assert sizes == [10] * 10 and len(seen.unique()) == 100


def test_sequential_batches_are_views_in_order() -> None:
    x, y = torch.arange(25).float(), torch.arange(25)
    batches = TensorBatches(x, y, batch_size=10)
    seen, sizes = _epoch(batches)
    assert torch.equal(seen, y) and sizes == [10, 10, 5]
    first_x, _ = next(iter(batches))
    assert first_x.data_ptr() == x.data_ptr()  # a slice, not a copy


@pytest.mark.parametrize("shuffle", [True, False])
def test_ranks_take_disjoint_equal_shards(shuffle: bool) -> None:
    x, y = torch.arange(103).float(), torch.arange(103)
    shards = [
        TensorBatches(x, y, batch_size=10, shuffle=shuffle, seed=5, rank=r, world_size=2)
        for r in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == 6  # ceil(103 / 2) = 52 samples each
    seen = [_epoch(shard)[0] for shard in shards]
    assert len(seen[0]) == len(seen[1]) == 52
    # Together they cover everything; the one padding sample is the only repeat.
    assert set(torch.cat(seen).tolist()) == set(range(103))
    assert len(set(seen[0].tolist()) & set(seen[1].tolist())) <= 1

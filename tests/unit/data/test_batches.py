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


# ----------------------------------------------------------------------------------------------
# Resuming mid-epoch: the batch order's state
# ----------------------------------------------------------------------------------------------


def _labels(batches) -> list[list[int]]:
    return [y.tolist() for _, y in batches]


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_loaded_state_goes_on_with_the_rest_of_the_epoch(world_size: int) -> None:
    x, y = torch.arange(103).float(), torch.arange(103)
    make = lambda: TensorBatches(x, y, batch_size=10, shuffle=True, seed=4, rank=world_size - 1,  # noqa: E731
                                 world_size=world_size)
    straight = make()
    straight.sampler.set_epoch(2)
    whole = _labels(straight)
    interrupted = make()
    interrupted.sampler.set_epoch(2)
    it = iter(interrupted)
    seen = [next(it)[1].tolist() for _ in range(4)]
    state = interrupted.state_dict()
    assert state == {"epoch": 2, "batches": 4, "batch_size": 10, "samples": 103, "world_size": world_size}
    resumed = make()  # a new loader, as after a restart
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)  # Lightning sets the epoch after loading the state
    assert seen + _labels(resumed) == whole
    resumed.sampler.set_epoch(3)
    assert len(_labels(resumed)) == len(resumed)  # the state applies to its own epoch only


def test_a_state_saved_at_the_end_of_an_epoch_starts_the_next_afresh() -> None:
    x, y = torch.arange(30).float(), torch.arange(30)
    done = TensorBatches(x, y, batch_size=10, shuffle=True)
    _labels(done)
    assert done.state_dict()["epoch"] == 0 and done.state_dict()["batches"] == 3
    resumed = TensorBatches(x, y, batch_size=10, shuffle=True)
    resumed.load_state_dict(done.state_dict())
    resumed.sampler.set_epoch(1)
    fresh = TensorBatches(x, y, batch_size=10, shuffle=True)
    fresh.sampler.set_epoch(1)
    assert _labels(resumed) == _labels(fresh)
    assert TensorBatches(x, y, batch_size=10).state_dict()["batches"] == 0  # nothing served yet


def test_a_state_from_other_data_warns_naming_the_difference() -> None:
    x, y = torch.arange(30).float(), torch.arange(30)
    state = {"epoch": 0, "batches": 1, "batch_size": 5, "samples": 30, "world_size": 1}
    batches = TensorBatches(x, y, batch_size=10)
    with pytest.warns(UserWarning, match=r"batch_size: 5 → 10.*skips its first 1 batches"):
        batches.load_state_dict(state)
    assert _labels(batches)[0] == list(range(10, 20))


def test_lightning_sees_a_resumable_loader() -> None:
    from lightning.fabric.utilities.types import _Stateful

    assert isinstance(TensorBatches(torch.zeros(2), torch.zeros(2), batch_size=1), _Stateful)

"""In-memory batching: a train/validation split, each rank's order of an epoch, batches cut from tensors.

Batches are cut from two whole-dataset tensors by slicing (sequential order) or
``index_select`` (shuffled or sharded order), never by a per-sample ``__getitem__`` and a
collate function.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping

import numpy as np
import torch

__all__ = ["ShardedOrder", "TensorBatches", "split_indices"]


def split_indices(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint train/validation indices of ``range(n)``, fixed by ``seed``.

    Args:
        n: Number of samples.
        val_size: Number of validation samples, ``0 <= val_size < n``.
        seed: Seed of the ``torch.Generator`` drawing the permutation.

    Returns:
        ``(train, val)`` sorted int64 index tensors that together cover ``range(n)`` once.
    """
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in [0, {n}), got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


class ShardedOrder:
    """The order in which one rank visits ``n`` samples in an epoch.

    Shuffled orders are a permutation drawn from ``(seed, epoch)`` alone, so every rank draws
    the same one and resuming at an epoch reproduces it. Under ``world_size > 1`` the order is
    padded by wrapping around to a multiple of ``world_size`` (like ``DistributedSampler``, so
    every rank runs the same number of batches) and rank ``r`` takes positions ``r::world_size``.

    Lightning calls ``set_epoch`` on a loader's ``sampler`` before each epoch; without a
    Trainer, each ``epoch_indices()`` call moves on to the next epoch.

    Args:
        n: Number of samples.
        shuffle: Draw a new permutation each epoch; else visit in order.
        seed: Base seed of the per-epoch permutations.
        rank: This process's rank.
        world_size: Number of processes sharing the data.
    """

    def __init__(
        self, n: int, shuffle: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.n = n
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``epoch_indices()`` return the order of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size) if self.n else 0

    def epoch_indices(self) -> torch.Tensor | None:
        """This rank's indices for the current epoch, then advance the epoch.

        Returns:
            An int64 tensor, or ``None`` for the identity order (read by slicing, no copy).
        """
        epoch, self.epoch = self.epoch, self.epoch + 1
        if not self.shuffle and self.world_size == 1:
            return None
        if self.shuffle:
            # SeedSequence mixes (seed, epoch) so that seed s, epoch e+1 != seed s+1, epoch e.
            entropy = [self.seed % 2**64, epoch]
            g = torch.Generator().manual_seed(
                int(np.random.SeedSequence(entropy).generate_state(1)[0])
            )
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        padded = len(self) * self.world_size
        if padded > self.n:
            order = torch.cat([order, order[: padded - self.n]])
        return order[self.rank :: self.world_size]


class TensorBatches:
    """Batches ``(x[i], y[i])`` cut from in-memory tensors by slicing or ``index_select``.

    An iterable with ``__len__``, which Lightning accepts as a dataloader. It is not a
    ``torch.utils.data.DataLoader``, so Lightning neither injects a ``DistributedSampler`` nor
    re-instantiates it: sharding is done here, from ``rank`` and ``world_size``.

    It is resumable mid-epoch: :meth:`state_dict` says which epoch is being served and how
    many of its batches have been handed out, and Lightning (2.x) saves it with the training
    loader in every checkpoint (``loops.fit_loop.state_dict.combined_loader``) and gives it to
    the new loader's :meth:`load_state_dict` on resume. The resumed epoch then goes on from the
    next batch, so a checkpoint taken every *k* steps resumes bit for bit (without it, the
    resumed epoch would start over: the first batches seen twice, the last never).

    Args:
        x: Inputs, first dimension = samples.
        y: Targets, same first dimension.
        batch_size: Samples per batch.
        shuffle: New random order each epoch (training); else sequential.
        seed: Base seed of the shuffling.
        drop_last: Drop the last batch when it is smaller than ``batch_size``.
        rank: This process's rank.
        world_size: Number of processes; each rank gets a disjoint shard.

    Example:
        >>> batches = TensorBatches(torch.arange(10.0), torch.arange(10), batch_size=4)
        >>> len(batches), [len(y) for _, y in batches]
        (3, [4, 4, 2])
        >>> it = iter(batches); _ = next(it); batches.state_dict()
        {'epoch': 1, 'batches': 1, 'batch_size': 4, 'samples': 10, 'world_size': 1}
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.x = x
        self.y = y
        self.batch_size = batch_size
        self.drop_last = drop_last
        # Named `sampler` because Lightning calls `dataloader.sampler.set_epoch(epoch)` before
        # every epoch; this keeps the shuffle right across reloaded loaders and resumed runs.
        self.sampler = ShardedOrder(len(x), shuffle, seed, rank, world_size)
        # Lightning reads `batch_sampler` whenever `sampler` exists (to detect shuffling).
        self.batch_sampler = None
        # Where the epoch being served stands: (epoch, batches handed out); None before any.
        self._position: tuple[int, int] | None = None
        self._resume_at: tuple[int, int] | None = None

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # A generator: this runs at the first next(), after Lightning's set_epoch for the epoch.
        epoch = self.sampler.epoch
        indices = self.sampler.epoch_indices()
        done = 0
        if self._resume_at is not None:
            resume_epoch, resume_batches = self._resume_at
            self._resume_at = None
            if resume_epoch == epoch:  # else the checkpoint ended its epoch: start the next afresh
                done = min(resume_batches, len(self))
        self._position = (epoch, done)
        for start in range(done * self.batch_size, len(self) * self.batch_size, self.batch_size):
            end = start + self.batch_size
            self._position = (epoch, start // self.batch_size + 1)  # counted when handed out
            if indices is None:
                yield self.x[start:end], self.y[start:end]
            else:
                batch = indices[start:end]
                yield self.x.index_select(0, batch), self.y.index_select(0, batch)

    def state_dict(self) -> dict[str, int]:
        """Where the epoch order stands: the epoch being served and the batches handed out.

        With the batch size, sample count and world size it was computed for, which
        :meth:`load_state_dict` compares. Before the first batch: the coming epoch, 0 batches.
        """
        epoch, batches = self._position if self._position is not None else (self.sampler.epoch, 0)
        return {"epoch": epoch, "batches": batches, "batch_size": self.batch_size, "samples": self.sampler.n,
                "world_size": self.sampler.world_size}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Go on from ``state`` (a :meth:`state_dict`): the next iteration of that epoch skips
        the batches already handed out.

        A state computed for another batch size, dataset size or world size still skips that
        many batches (Lightning counts the resumed epoch's batches the same way), with a warning
        that the resumed epoch is then not the one interrupted.
        """
        mine = self.state_dict()
        changed = [f"{k}: {state[k]} → {mine[k]}" for k in ("batch_size", "samples", "world_size")
                   if k in state and state[k] != mine[k]]
        if changed:
            warnings.warn(
                f"resuming the batch order of a checkpoint taken with other data ({'; '.join(changed)}): "
                f"the rest of epoch {state['epoch']} skips its first {state['batches']} batches but is not "
                "the order the interrupted run would have seen",
                UserWarning,
                stacklevel=2,
            )
        self._resume_at = (int(state["epoch"]), int(state["batches"]))

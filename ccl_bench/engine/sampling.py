"""Deterministic sampling: which items each rank trains on, in which order, with which augmentation seeds.

Everything here is a function of the run's seed, the epoch and the item index, never of the global torch
generator, the number of workers or whether the run was resumed: every method sees the same batches, and a
resumed run draws exactly what the uninterrupted one draws.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import distributed

HOLDOUT_EPOCH = -1  # the epoch number of the held-out slice's item seeds and loader (never a training epoch)
EVAL_STREAM = -2  # the stream of the validation loader's worker seeds


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of dataset item ``index`` in ``epoch`` (independent of ranks and workers)."""
    return (((seed * 1_000_003) + epoch) * 1_000_003 + index) % (2 ** 63)


def private_generator(seed: int, stream: int) -> torch.Generator:
    """A generator for a DataLoader's worker seeds, so that creating a loader leaves the global generator (dropout,
    views) untouched: a resumed run draws exactly what the uninterrupted one draws."""
    return torch.Generator().manual_seed(item_seed(seed, stream, 0))


class SeededItems(Dataset):
    """``dataset[(index, seed)]``: the item drawn with the global torch generator seeded by ``seed`` (the
    caller's generator state is restored), so augmentations do not depend on workers or on resuming."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        # only the CPU generator, saved and restored: torch.manual_seed would also reseed every CUDA generator,
        # which fork_rng(devices=[]) does not restore (dropout on the GPU would then follow the data items)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


def split_holdout(size: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(held out, training)`` indices of a training set of ``size`` items: a ``fraction`` (at least one item)
    drawn with ``seed``; no hold-out when ``fraction`` is 0."""
    if fraction <= 0:
        return [], list(range(size))
    perm = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    k = max(1, round(size * fraction))
    return sorted(perm[:k]), sorted(perm[k:])


class TrainingOrder:
    """The batches of each epoch for one rank: the training ``indices`` shuffled per epoch (``seed``), cut into
    full batches, each item with its :func:`item_seed`."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], *, seed: int, batch_size: int, num_workers: int,
                 pin_memory: bool, dist: distributed.DistInfo):
        self.dataset, self.indices, self.seed = dataset, list(indices), seed
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.sampler = DistributedSampler(self.indices, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                          seed=seed, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"data.batch_size={batch_size}: the training set gives {len(self.sampler)} items per "
                             f"process ({len(self.indices)} in all, {dist.world_size} processes); expected at "
                             "least one full batch")

    def loader(self, epoch: int, offset: int) -> DataLoader:
        """Batches ``offset..`` of ``epoch`` (the same for every method and after a resume)."""
        self.sampler.set_epoch(epoch)
        positions = list(self.sampler)
        bs = self.batch_size
        batches = []
        for b in range(offset, self.steps_per_epoch):
            items = [self.indices[p] for p in positions[b * bs:(b + 1) * bs]]
            batches.append([(i, item_seed(self.seed, epoch, i)) for i in items])
        return DataLoader(SeededItems(self.dataset), batch_sampler=batches, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, generator=private_generator(self.seed, epoch))


class HoldoutSlice:
    """Batches of the held-out training slice for a method's per-epoch estimate (``Method.on_epoch_start``):
    ``(x, y)`` on ``device`` under ``autocast()``, the ``students`` in eval mode meanwhile; each rank reads its
    share and :meth:`sum` adds a CPU tensor over the ranks."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], *, seed: int, batch_size: int, num_workers: int,
                 students: Sequence[nn.Module], device: torch.device,
                 autocast: Callable[[], AbstractContextManager], dist: distributed.DistInfo):
        self.dataset, self.indices, self.seed = dataset, list(indices), seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.students, self.device, self.autocast, self.dist = list(students), device, autocast, dist

    def __iter__(self):
        mine = self.indices[self.dist.rank::self.dist.world_size]
        keys = [(i, item_seed(self.seed, HOLDOUT_EPOCH, i)) for i in mine]
        loader = DataLoader(SeededItems(self.dataset), batch_size=self.batch_size, sampler=keys,
                            num_workers=self.num_workers, generator=private_generator(self.seed, HOLDOUT_EPOCH))
        modes = [m.training for m in self.students]
        for m in self.students:
            m.eval()
        try:
            for x, y in loader:
                with self.autocast():
                    yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        finally:
            for m, mode in zip(self.students, modes):
                m.train(mode)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce_sum(tensor, self.dist)

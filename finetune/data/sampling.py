"""The training order and the augmentation draws as functions of (seed, epoch, position) only.

Nothing depends on how many loader workers ran, on where a run was stopped, or on how the global batch is
split over ranks, so that

- a resumed run sees the batches and augmentations the uninterrupted run would have seen (``resume``);
- ``N`` ranks with batches of ``B`` see, step by step, the images and augmentations one process sees with
  batches of ``N x B`` (rank ``r`` takes every ``N``-th position from ``r``, like torch's DistributedSampler).

The sampler yields ``(index, augmentation seed)`` pairs; ``ImageFolderDataset`` seeds the transform with the
second before drawing its crop, flip and jitter.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


def balanced_weights(labels: Sequence[int]) -> torch.Tensor:
    """One weight per image such that every class has the same total probability."""
    if not labels:
        raise ValueError("balanced_weights needs at least one label")
    counts = Counter(labels)
    return torch.tensor([1.0 / counts[label] for label in labels], dtype=torch.double)


def mix(*values: int) -> int:
    """One 32-bit seed from several integers (numpy's SeedSequence: nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence(values).generate_state(1)[0])


class EpochSampler(Sampler[tuple[int, int]]):
    """``size`` images per epoch in a seeded random order: a permutation, or with ``weights`` a draw with
    replacement (class-balanced sampling). With ``world`` ranks the order is padded to a multiple of
    ``world`` (by repeating its start) and this rank takes positions ``rank, rank + world, ...``."""

    def __init__(self, size: int, *, seed: int = 0, weights: torch.Tensor | None = None, rank: int = 0,
                 world: int = 1) -> None:
        self.size, self.seed, self.weights, self.rank, self.world = size, seed, weights, rank, world
        self.epoch = 0
        self._resume_at: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this before every epoch."""
        self.epoch = epoch

    def resume(self, epoch: int, done: int) -> None:
        """Epoch ``epoch`` already trained on this rank's first ``done`` images: leave them out of it."""
        self._resume_at = (epoch, done)

    def __len__(self) -> int:
        return math.ceil(self.size / self.world)

    def order(self, epoch: int) -> torch.Tensor:
        """Every rank's positions of ``epoch``: the global order, padded to a multiple of ``world``."""
        generator = torch.Generator().manual_seed(mix(self.seed, epoch))
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.size, replacement=True, generator=generator)
        else:
            order = torch.randperm(self.size, generator=generator)
        padding = len(self) * self.world - self.size
        return torch.cat([order, order[:padding]]) if padding else order

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.order(self.epoch)
        start = 0
        if self._resume_at is not None and self._resume_at[0] == self.epoch:
            start = self._resume_at[1]
            self._resume_at = None
        for position in range(self.rank + start * self.world, len(order), self.world):
            yield int(order[position]), mix(self.seed, self.epoch, position)

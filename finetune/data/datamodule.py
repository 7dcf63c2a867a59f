"""Datasets, collation and the LightningDataModule for an image folder.

A file that cannot be decoded never stops training: the dataset returns it as a failed item, the collate
function drops it and reports its path in the batch's `skipped` list, and the training step can count or
log those paths.

Batches are `(images, labels, skipped)`: images float32 [B, 3, H, W], labels int64 [B], skipped list[str].
B can be 0 when every image of a batch failed; the training step must then skip the batch.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from ..distributed import Ranks
from ..errors import ImageDecodeError
from ..runtime import usable_cpus
from .cache import DecodedImageCache, FillStats
from .folders import DatasetSplits, Sample
from .images import load_rgb
from .sampling import EpochSampler, balanced_weights
from .transforms import build_transforms, parse_data_config

logger = logging.getLogger("finetune.data")

Item = tuple[torch.Tensor | None, int, str | None]
Batch = tuple[torch.Tensor, torch.Tensor, list[str]]
AUGMENT_KEYS = ("scale_min", "hflip", "color_jitter")
MAX_DEFAULT_WORKERS = 8


class ImageFolderDataset(Dataset[Item]):
    """Samples decoded with `load_rgb` and passed through an albumentations-style transform.

    Item i is `(tensor, label, None)`, or `(None, label, path)` when the file cannot be decoded (a warning
    naming the file is logged on the "finetune.data" logger). With a `DecodedImageCache`, images it holds
    are read from it instead of being decoded (see `finetune.data.cache`).
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable[..., dict[str, Any]],
                 cache: DecodedImageCache | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.cache = cache

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> Item:
        """Image ``key``, or ``(index, seed)`` as `sampling.EpochSampler` yields them: the transform's random
        draws are seeded with ``seed`` first."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        sample = self.samples[index]
        try:
            image = load_rgb(sample.path) if self.cache is None else self.cache.load(sample.path)
        except ImageDecodeError as exc:
            logger.warning("skipping %s: %s", sample.path, exc.reason)
            return None, sample.label, str(sample.path)
        if seed is not None:
            self.transform.set_random_seed(seed)
        return self.transform(image=image)["image"], sample.label, None


def collate_skipping(batch: Sequence[Item], image_shape: tuple[int, int, int] | None = None) -> Batch:
    """Stack the decoded items, drop the failed ones and list their paths.

    When every item failed the images tensor is empty: shape (0, *image_shape) when `image_shape`
    (C, H, W) is given (the datamodule passes it), else shape (0,). Labels are then shape (0,).
    """
    good = [(image, label) for image, label, _ in batch if image is not None]
    skipped = [path for image, _, path in batch if image is None and path is not None]
    if not good:
        empty_shape = (0, *image_shape) if image_shape is not None else (0,)
        return torch.empty(empty_shape, dtype=torch.float32), torch.empty(0, dtype=torch.long), skipped
    images = torch.stack([image for image, _ in good])
    labels = torch.tensor([label for _, label in good], dtype=torch.long)
    return images, labels, skipped


def default_num_workers() -> int:
    """One worker per CPU this process may use, minus one for the main process, at most 8."""
    return max(0, min(usable_cpus() - 1, MAX_DEFAULT_WORKERS))


def _seed_worker(worker_id: int) -> None:
    """Give each loader worker its own augmentation stream (for the passes without an `EpochSampler`).

    Workers start as copies of the main process, so their albumentations generators would otherwise be
    identical and every worker would draw the same crops. torch.initial_seed() differs per worker and
    derives from the loader's seeded generator, so runs stay reproducible.
    """
    info = get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info is not None else None
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(torch.initial_seed() % 2**32)


class ImageFolderDataModule(pl.LightningDataModule):
    """Train / val / test loaders over `DatasetSplits`, preprocessed for one backbone's data config.

    `augment` holds keyword arguments for the train transform (`scale_min`, `hflip`, `color_jitter`).
    `num_workers=None` picks `default_num_workers()`; `pin_memory` is for a CUDA device
    (`finetune.device.Device.pin_memory`).
    `seed` fixes the shuffling order and the augmentation draws: the training loader's `sampling.EpochSampler`
    makes both functions of (seed, epoch, position), and with `ranks` (several processes, see
    `finetune.distributed`) gives this rank its share of each epoch. `class_balanced=True` draws every class
    about equally often instead of shuffling (see `balance.plan_balance`).
    `decoded_cache=True` reads images through a `DecodedImageCache` of `splits.root` (default location and
    budget), filled with every split's images before the first loader starts; pass a `DecodedImageCache` to
    choose its folder or budget.
    """

    def __init__(
        self,
        splits: DatasetSplits,
        data_config: Mapping[str, Any],
        *,
        batch_size: int = 32,
        num_workers: int | None = None,
        augment: Mapping[str, Any] | None = None,
        pin_memory: bool = False,
        seed: int = 0,
        class_balanced: bool = False,
        decoded_cache: bool | DecodedImageCache = False,
        ranks: Ranks | None = None,
    ) -> None:
        super().__init__()
        _check_loader_args(batch_size, num_workers, augment)
        self.splits = splits
        self.data_config = dict(data_config)
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.class_balanced = bool(class_balanced)
        self.ranks = ranks or Ranks()
        self.augment = dict(augment or {})
        self.decoded_cache = _decoded_cache(decoded_cache, splits.root, self.data_config)
        self._cache_filled = False
        cfg = parse_data_config(self.data_config)
        self.image_shape = (3, *cfg.size)
        self.train_transform = build_transforms(self.data_config, True, seed=seed, **self.augment)
        self.eval_transform = build_transforms(self.data_config, False)
        self.train_dataset = ImageFolderDataset(splits.train, self.train_transform, self.decoded_cache)
        self.val_dataset = ImageFolderDataset(splits.val, self.eval_transform, self.decoded_cache)
        self.test_dataset = ImageFolderDataset(splits.test, self.eval_transform, self.decoded_cache)

    @property
    def classes(self) -> list[str]:
        return list(self.splits.classes)

    @property
    def num_classes(self) -> int:
        return len(self.splits.classes)

    @property
    def has_test(self) -> bool:
        return len(self.test_dataset) > 0

    def train_dataloader(self) -> DataLoader[Item]:
        # drop_last avoids a tiny last batch (noisy BatchNorm statistics), unless it would leave no batch.
        drop_last = len(self.train_sampler) > self.batch_size
        return self._loader(self.train_dataset, drop_last=drop_last, sampler=self.train_sampler)

    @functools.cached_property
    def train_sampler(self) -> EpochSampler:
        """One sampler for the datamodule's life: ``resume`` on it reaches the loader Lightning builds."""
        labels = [s.label for s in self.splits.train]
        weights = balanced_weights(labels) if self.class_balanced and labels else None
        return EpochSampler(len(labels), seed=self.seed, weights=weights, rank=self.ranks.rank,
                            world=self.ranks.world)

    def val_dataloader(self) -> DataLoader[Item]:
        return self._loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader[Item]:
        """The test loader; it has zero batches when the folder has no test split (see `has_test`)."""
        return self._loader(self.test_dataset)

    def feature_loader(self, split: str, augment: bool = False, num_workers: int | None = None,
                       shard: bool = False) -> DataLoader[Item]:
        """Every image of ``split`` once, in order (no shuffling, nothing dropped), for caching features:
        the eval transform, or the training augmentation when ``augment`` (one augmented view per pass).
        ``num_workers`` overrides the datamodule's for this pass. ``shard``: this rank's share only."""
        samples = {"train": self.splits.train, "val": self.splits.val, "test": self.splits.test}[split]
        if shard:
            samples = self.ranks.shard(samples)
        transform = self.train_transform if augment else self.eval_transform
        # a one-off pass: persistent workers would outlive it for nothing
        return self._loader(ImageFolderDataset(samples, transform, self.decoded_cache), persistent=False,
                            num_workers=num_workers)

    def fill_decoded_cache(self) -> FillStats | None:
        """Decode every image of every split into the decoded-image cache, once per datamodule (a no-op
        without a cache). Called before the first loader is built, so loader workers, started afterwards,
        only read the cache. The main process only writes while decoding runs in loader worker processes,
        so it uses one more worker than the loaders (at most one per CPU)."""
        if self.decoded_cache is None or self._cache_filled:
            return None
        self._cache_filled = True
        paths = [s.path for s in (*self.splits.train, *self.splits.val, *self.splits.test)]
        workers = min(self.num_workers + 1, usable_cpus()) if self.num_workers else 0
        return self.decoded_cache.fill(paths, workers=workers)

    def _loader(
        self,
        dataset: ImageFolderDataset,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        persistent: bool = True,
        sampler: Sampler[int] | None = None,
        num_workers: int | None = None,
    ) -> DataLoader[Item]:
        self.fill_decoded_cache()
        workers = (self.num_workers if num_workers is None else num_workers) if len(dataset) > 0 else 0
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=drop_last,
            # the loader's own seeded generator: starting an epoch's iterator draws from it, never from torch's
            # global generator, which dropout draws from and a resumed run restores (phases/resume.py)
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=workers,
            persistent_workers=persistent and workers > 0,
            pin_memory=self.pin_memory,
            worker_init_fn=_seed_worker if workers > 0 else None,
            collate_fn=functools.partial(collate_skipping, image_shape=self.image_shape),
        )


def _decoded_cache(value: bool | DecodedImageCache | None, root: os.PathLike[str] | str,
                   data_config: Mapping[str, Any]) -> DecodedImageCache | None:
    if isinstance(value, DecodedImageCache):
        return value
    if value is True:
        return DecodedImageCache.for_dataset(root, data_config)
    if value is False or value is None:
        return None
    raise ValueError(f"decoded_cache must be True, False or a DecodedImageCache, got {value!r}")


def _check_loader_args(batch_size: int, num_workers: int | None, augment: Mapping[str, Any] | None) -> None:
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if num_workers is not None and not (isinstance(num_workers, (int, np.integer)) and num_workers >= 0):
        raise ValueError(
            f"num_workers must be an integer >= 0 (0 loads in the main process), got {num_workers!r}"
        )
    unknown = sorted(set(augment or {}) - set(AUGMENT_KEYS))
    if unknown:
        raise ValueError(f"unknown augment keys {unknown}; allowed: {', '.join(AUGMENT_KEYS)}")

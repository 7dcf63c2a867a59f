"""The frozen-part cache: for recipes that fine-tune only their top stages, the layers below the first trained
stage run once, before the Lightning epochs, instead of once per epoch.

Those layers are frozen for the whole Lightning run (no gradient, eval mode: ``Classifier.train`` keeps them
there, so their BatchNorm statistics do not move and their stochastic depth is off), so they compute the
same activations every epoch for the same input. They run once over ``V`` augmented views of every training
image (view ``v`` of image ``i`` drawn with the seed ``sampling`` derives from (seed, v, i)) and once over the
validation and test images, in the training's precision; the activations are kept as float16, in memory when
they fit, else in a memory-mapped file of the ``activations`` cache (``finetune cache list|clear``), removed
when the epochs end. Epoch ``e`` trains image ``i`` on view ``(e + i) % V``, through the trained stages and
the head only: the frozen modules are swapped for identities while Lightning runs, and back afterwards, so the
kept and exported model is the whole network.

Whenever the cache cannot be exact or cannot be stored it is not used, with one logged reason: several
processes, a backbone whose frozen modules are not a plain prefix of its forward pass (checked on the first
batch against the whole network), too little memory and disk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from numpy.lib.format import open_memmap
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .. import caches
from ..data import ImageFolderDataModule
from ..data.datamodule import ImageFolderDataset, collate_skipping
from ..data.sampling import EpochSampler, mix
from ..device import CPU, Device
from ..distributed import Ranks
from ..model.classifier import Classifier
from ..model.frozen_forward import FrozenPass
from ..progress import Phases
from ..recipes import Recipe
from ..runtime import Precision

log = logging.getLogger("finetune")

KIND = "activations"
MEMORY_SHARE = 0.25  # of the available RAM that activations may take before they go to disk
DISK_HEADROOM = 2 * 1024**3  # left free on the cache's disk
# the cached path must give the whole network's logits (float32, eval mode) to float32 rounding
CHECK_ATOL = 1e-4
CHECK_RTOL = 1e-3


@dataclass
class FrozenCache:
    """The frozen part's activations: ``train`` [V, N, ...], ``val`` and ``test`` [N, ...] float16, with a mask
    of the images that decoded; ``owners`` are the frozen modules the cached path skips."""

    owners: list[str]
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    ok: dict[str, np.ndarray]
    path: Path | None  # the memory-mapped file, None in memory
    fill_s: float

    @property
    def views(self) -> int:
        return int(self.train.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.train.nbytes + self.val.nbytes + self.test.nbytes)

    def to_summary(self) -> dict[str, Any]:
        return {"used": True, "views": self.views, "frozen_modules": len(self.owners),
                "activation_shape": list(self.train.shape[2:]), "train_shape": list(self.train.shape),
                "bytes": self.nbytes, "storage": "memory" if self.path is None else "disk", "fill_s": self.fill_s}

    def close(self) -> None:
        """Release the arrays and delete the memory-mapped file (it is only valid for this run's weights)."""
        self.train = self.val = self.test = np.empty(0, np.float16)
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def unused(reason: str) -> dict[str, Any]:
    return {"used": False, "reason": reason}


def frozen_owners(classifier: Classifier) -> list[str]:
    """The largest modules whose parameters are all frozen (after ``set_trainable``): what the cache replaces."""
    modules = dict(classifier.named_modules())
    owners = []
    for name, module in modules.items():
        params = list(module.parameters())
        if not name or not params or any(p.requires_grad for p in params):
            continue
        parent = modules[name.rpartition(".")[0]]
        if any(p.requires_grad for p in parent.parameters()):
            owners.append(name)
    return owners


class _Stop(Exception):
    def __init__(self, output: torch.Tensor) -> None:
        self.output = output


class FrozenPrefix(nn.Module):
    """The network up to the output of its last frozen module (the forward pass stops there)."""

    def __init__(self, classifier: Classifier, last: str) -> None:
        super().__init__()
        self.classifier = classifier
        self.last = last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def stop(module, args, output):
            raise _Stop(output)

        handle = self.classifier.get_submodule(self.last).register_forward_hook(stop)
        try:
            self.classifier(x)
        except _Stop as s:
            return s.output
        finally:
            handle.remove()
        raise RuntimeError(f"{self.last} did not run in the forward pass")


def _identity(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return x


@contextlib.contextmanager
def skipping(classifier: Classifier, owners: Sequence[str]) -> Iterator[None]:
    """While inside: the frozen modules pass their input through, so the network reads cached activations."""
    modules = [classifier.get_submodule(name) for name in owners]
    for module in modules:
        module.forward = _identity
    try:
        yield
    finally:
        for module in modules:
            del module.forward


def _execution_order(classifier: Classifier, owners: Sequence[str], images: torch.Tensor) -> list[str]:
    ran: list[str] = []
    handles = [classifier.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: ran.append(n)) for n in owners]
    try:
        with torch.inference_mode():
            classifier(images)
    finally:
        for h in handles:
            h.remove()
    return ran


def check_split(classifier: Classifier, owners: Sequence[str], images: torch.Tensor) -> str | None:
    """None when the frozen modules form a prefix of the forward pass that the cached path reproduces exactly
    (float32, eval mode, on ``images``); else why not."""
    classifier.eval()
    ran = _execution_order(classifier, owners, images)
    if sorted(set(ran)) != sorted(owners) or len(ran) != len(owners):
        return "its frozen modules do not each run once per forward pass"
    with torch.inference_mode():
        whole = classifier(images)
        activations = FrozenPrefix(classifier, ran[-1])(images)
        with skipping(classifier, owners):
            cached = classifier(activations)
    if cached.shape != whole.shape or not torch.allclose(cached, whole, atol=CHECK_ATOL, rtol=CHECK_RTOL):
        return "the top stages on the frozen part's output do not reproduce the whole network's logits"
    return None


def available_memory() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _storage(nbytes: int, name: str) -> tuple[Path | None, str | None]:
    """(None, None): in memory; (path, None): a memory-mapped file there; (None, reason): nowhere."""
    if nbytes <= MEMORY_SHARE * available_memory():
        return None, None
    kind = caches.KINDS[KIND]
    if kind.budget_bytes is not None and nbytes > kind.budget_bytes:
        return None, f"{nbytes / 1024**3:.1f} GiB of activations exceed the {KIND} cache's budget"
    kind.folder.mkdir(parents=True, exist_ok=True)
    caches.prune(KIND)  # older runs' leftovers first
    free = shutil.disk_usage(kind.folder).free
    if nbytes + DISK_HEADROOM > free:
        return None, f"{nbytes / 1024**3:.1f} GiB of activations do not fit in memory or on {kind.folder}'s disk"
    return kind.folder / f"{name}-{os.getpid()}.npy", None


def build(classifier: Classifier, datamodule: ImageFolderDataModule, recipe: Recipe, *, device: Device,
          precision: Precision, ranks: Ranks, phases: Phases, name: str) -> tuple[FrozenCache | None, dict[str, Any]]:
    """The frozen part's activations for ``recipe.frozen_cache_views`` views, or None and why not (logged)."""
    views = recipe.frozen_cache_views
    if ranks.distributed:
        return _fallback("it runs on one process only")
    classifier.set_trainable(recipe.unfreeze_stages)
    owners = frozen_owners(classifier)
    if not owners:
        return _fallback("no part of the backbone stays frozen")
    started = time.perf_counter()
    splits = datamodule.splits
    n = {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)}
    probe_images = next((images for indices, images, _ in _batches(datamodule, "train", 0, min(8, n["train"]),
                                                                   workers=0) if len(indices)), None)
    if probe_images is None:
        return _fallback("no training image decodes")
    reason = check_split(CPU.place(classifier), owners, probe_images)
    if reason:
        return _fallback(f"{recipe.model}: {reason}")
    last = _execution_order(classifier, owners, probe_images[:1])[-1]
    runner = FrozenPass(FrozenPrefix(classifier, last), device=device, bf16=precision.lightning == "bf16-mixed",
                        channels_last=precision.channels_last)
    shape = tuple(runner(probe_images[:1])[0].shape[1:])
    rows = views * n["train"] + n["val"] + n["test"]
    nbytes = rows * int(np.prod(shape)) * np.dtype(np.float16).itemsize
    path, reason = _storage(nbytes, name)
    if reason:
        return _fallback(reason)
    flat = np.zeros((rows, *shape), np.float16) if path is None else \
        open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, *shape))
    a, b = views * n["train"], views * n["train"] + n["val"]  # the training images' views, validation, test
    arrays = {"train": flat[:a].reshape(views, n["train"], *shape), "val": flat[a:b], "test": flat[b:]}
    ok = {"train": np.zeros((views, n["train"]), bool), "val": np.zeros(n["val"], bool),
          "test": np.zeros(n["test"], bool)}
    with phases.run(f"frozen part: {n['train']} training images x {views} view(s), {n['val']} validation, "
                    f"{n['test']} test", rows) as step:
        for split, passes in (("train", range(views)), ("val", [None]), ("test", [None])):
            for view in passes:
                target = arrays[split] if view is None else arrays[split][view]
                mask = ok[split] if view is None else ok[split][view]
                for indices, images, count in _batches(datamodule, split, view, datamodule.batch_size):
                    if len(indices):
                        target[indices] = runner(images)[0].numpy().astype(np.float16)
                        mask[indices] = True
                    step(count)
    if isinstance(flat, np.memmap):
        flat.flush()
    cache = FrozenCache(owners, arrays["train"], arrays["val"], arrays["test"], ok, path,
                        time.perf_counter() - started)
    log.info("frozen part cached: %d module(s), activations %s x %d view(s), %.1f MiB %s, in %.1f s",
             len(owners), list(shape), views, nbytes / 1024**2, "in memory" if path is None else f"in {path}",
             cache.fill_s)
    return cache, cache.to_summary()


def _fallback(reason: str) -> tuple[None, dict[str, Any]]:
    log.warning("frozen-part cache not used (%s): every epoch runs the whole network", reason)
    return None, unused(reason)


def view_seed(seed: int, view: int, index: int) -> int:
    """The augmentation seed of view ``view`` of training image ``index``."""
    return mix(seed, view, index)


def _batches(datamodule: ImageFolderDataModule, split: str, view: int | None, batch_size: int,
             workers: int | None = None) -> Iterator[tuple[np.ndarray, torch.Tensor, int]]:
    """(indices, images, images read) per batch of ``split``, in order, the images that decode only: view ``view``
    of the training images (augmented), the validation or test images as evaluation sees them."""
    samples = getattr(datamodule.splits, split)
    transform = datamodule.eval_transform if view is None else datamodule.train_transform
    dataset = ImageFolderDataset(samples, transform, datamodule.decoded_cache)
    keys = [i if view is None else (i, view_seed(datamodule.seed, view, i)) for i in range(len(samples))]
    loader = DataLoader(_Keyed(dataset, keys), batch_size=batch_size,
                        num_workers=datamodule.num_workers if workers is None else workers,
                        collate_fn=_collate_keyed)
    yield from loader


class _Keyed(Dataset):
    def __init__(self, dataset: ImageFolderDataset, keys: list) -> None:
        self.dataset, self.keys = dataset, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, position: int):
        key = self.keys[position]
        return (key if isinstance(key, int) else key[0]), self.dataset[key]


def _collate_keyed(batch):
    good = [(i, item[0]) for i, item in batch if item[0] is not None]
    if not good:
        return np.zeros(0, np.int64), torch.empty(0), len(batch)
    return np.array([i for i, _ in good]), torch.stack([t for _, t in good]), len(batch)


class ViewSampler(EpochSampler):
    """The ``EpochSampler``'s order (so resuming and balancing work alike); it yields (index, view) with the
    view ``(epoch + index) % views``: every image goes through every view once in ``views`` epochs."""

    def __init__(self, size: int, views: int, **kwargs: Any) -> None:
        super().__init__(size, **kwargs)
        self.views = views

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index, _ in super().__iter__():
            yield index, (self.epoch + index) % self.views


class ActivationDataset(Dataset):
    """Cached activations as ``ImageFolderDataset`` items: (float32 tensor, label, None), or (None, label, path)
    for an image that did not decode."""

    def __init__(self, array: np.ndarray, ok: np.ndarray, samples: Sequence) -> None:
        self.array, self.ok, self.samples = array, ok, list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]):
        index, view = key if isinstance(key, tuple) else (key, None)
        array, ok = (self.array, self.ok) if view is None else (self.array[view], self.ok[view])
        sample = self.samples[index]
        if not ok[index]:
            return None, sample.label, str(sample.path)
        return torch.from_numpy(np.asarray(array[index], np.float32)), sample.label, None


class CachedDataModule(pl.LightningDataModule):
    """The loaders of ``datamodule`` with cached activations in place of images (same order, same labels)."""

    def __init__(self, datamodule: ImageFolderDataModule, cache: FrozenCache) -> None:
        super().__init__()
        self.splits, self.batch_size, self.ranks = datamodule.splits, datamodule.batch_size, datamodule.ranks
        self.pin_memory, self.seed = datamodule.pin_memory, datamodule.seed
        source = datamodule.train_sampler
        self.train_sampler = ViewSampler(source.size, cache.views, seed=source.seed, weights=source.weights)
        self.shape = tuple(cache.train.shape[2:])
        self.datasets = {split: ActivationDataset(getattr(cache, split), cache.ok[split], getattr(self.splits, split))
                         for split in ("train", "val", "test")}

    @property
    def has_test(self) -> bool:
        return len(self.datasets["test"]) > 0

    def train_dataloader(self) -> DataLoader:
        drop_last = len(self.train_sampler) > self.batch_size
        return self._loader("train", sampler=self.train_sampler, drop_last=drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def _loader(self, split: str, **kwargs: Any) -> DataLoader:
        # reads from memory or a memory-mapped file: no worker processes
        return DataLoader(self.datasets[split], batch_size=self.batch_size, pin_memory=self.pin_memory,
                          collate_fn=lambda batch: collate_skipping(batch, self.shape), **kwargs)

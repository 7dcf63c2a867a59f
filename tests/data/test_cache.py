from __future__ import annotations

import json
import logging
import multiprocessing
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from imagefolders import photo_like
from PIL import Image

from finetune.data import DecodedImageCache, ImageFolderDataModule, ImageFolderDataset, build_transforms, load_rgb
from finetune.data.cache import cache_side
from finetune.data.folders import Sample, scan_image_folder

CONFIG = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic",
          "crop_pct": 0.875}  # cache side floor(32 / 0.875) = 36
LITE0 = {"input_size": (3, 224, 224), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
         "interpolation": "bicubic", "crop_pct": 0.875}
# Training crops from a cached image (shorter side 256) against the same crops (same seeds) from the 1000 x 800
# original: mean absolute difference in grey levels of 255 (measured 3-4 on scikit-image photos and
# 2.2 on these generated ones; cache_side explains why).
TRAIN_MEAN_ABS_DIFF = 5.0


def write_images(root: Path, count: int = 6, size: tuple[int, int] = (60, 80), seed: int = 0) -> list[Path]:
    """``count`` smooth random RGB images (h, w) = size in root/a and root/b, as PNG and JPEG."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8))
        path = folder / f"{i}.{'png' if i % 3 else 'jpg'}"
        coarse.resize((size[1] + 4 * i, size[0]), Image.Resampling.BICUBIC).save(path)
        paths.append(path)
    return paths


def rewrite(path: Path, colour: tuple[int, int, int], keep_stat: bool = False) -> None:
    """Replace a PNG's pixels with a solid colour; with ``keep_stat`` the size and mtime stay as they were
    (padding the file), so the cache cannot tell."""
    stat = path.stat()
    w, h = Image.open(path).size
    Image.new("RGB", (w, h), colour).save(path, format="PNG")
    if keep_stat:
        data = path.read_bytes()
        assert len(data) <= stat.st_size
        path.write_bytes(data + b"\0" * (stat.st_size - len(data)))  # Pillow ignores bytes after IEND
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    else:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


@pytest.fixture
def cache(tmp_path: Path) -> DecodedImageCache:
    return DecodedImageCache(tmp_path / "cache", side=36, interpolation="bicubic")


def test_side_is_the_eval_resize_size() -> None:
    assert cache_side(LITE0) == 256
    assert cache_side(CONFIG) == 36
    assert cache_side({**LITE0, "crop_pct": 1.15}) == 224  # never below the input size


def test_hits_misses_and_downscaling(tmp_path: Path, cache: DecodedImageCache) -> None:
    paths = write_images(tmp_path / "img")
    stats = cache.fill(paths)
    assert (stats.added, stats.cached, stats.failed) == (6, 0, 0)
    for path in paths:
        pixels = cache.get(path)
        assert pixels.dtype == np.uint8 and min(pixels.shape[:2]) == 36 and pixels.flags.writeable
    assert cache.get(tmp_path / "img" / "absent.png") is None
    assert (cache.hits, cache.misses) == (6, 1)
    assert cache.fill(paths).cached == 6  # nothing to decode the second time
    reopened = DecodedImageCache(tmp_path / "cache", side=36, interpolation="bicubic")
    assert len(reopened) == 6 and all(np.array_equal(reopened.get(p), cache.get(p)) for p in paths)
    assert len(DecodedImageCache(tmp_path / "cache", side=40, interpolation="bicubic")) == 0  # other settings


def test_small_images_are_stored_as_they_are(tmp_path: Path, cache: DecodedImageCache) -> None:
    [path] = write_images(tmp_path / "img", count=1, size=(20, 30))
    cache.fill([path])
    np.testing.assert_array_equal(cache.get(path), load_rgb(path))


def test_changed_file_is_decoded_again(tmp_path: Path, cache: DecodedImageCache) -> None:
    paths = write_images(tmp_path / "img")
    cache.fill(paths)
    rewrite(paths[1], (0, 255, 0))
    assert cache.get(paths[1]) is None  # size or mtime changed: a miss
    assert (cache.load(paths[1]) == (0, 255, 0)).all()  # decoded from the file as it is now
    stats = cache.fill(paths)
    assert (stats.dropped, stats.added, stats.cached) == (1, 1, 5)
    assert (cache.get(paths[1]) == (0, 255, 0)).all()
    paths[2].unlink()
    assert cache.fill(paths[:2]).dropped == 1  # entries of deleted files go too
    assert len(cache) == 5
    data = list((tmp_path / "cache").glob("data-*.u8"))
    assert len(data) == 1 and data[0].stat().st_size == cache.nbytes  # stale bytes reclaimed


def test_budget_is_respected(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "img", size=(36, 48))  # 36 x (48..68) x 3 bytes each
    budget = 2 * 36 * 56 * 3
    cache = DecodedImageCache(tmp_path / "cache", side=36, budget_bytes=budget)
    stats = cache.fill(paths)
    assert stats.added == 2 and stats.over_budget == 4
    assert cache.nbytes <= budget
    assert sum(p.stat().st_size for p in (tmp_path / "cache").glob("data-*.u8")) <= budget
    for path in paths[2:]:  # beyond the budget: decoded every time, from the original
        assert cache.get(path) is None
        np.testing.assert_array_equal(cache.load(path), load_rgb(path))
    assert DecodedImageCache(tmp_path / "c0", side=36, budget_bytes=0).fill(paths).added == 0


def test_eval_tensors_are_identical_to_uncached(tmp_path: Path) -> None:
    """Larger, smaller, portrait, landscape and odd sizes through the lite0 eval transform."""
    root = tmp_path / "img"
    rng = np.random.default_rng(1)
    sizes = [(800, 1000), (1000, 800), (333, 517), (257, 300), (200, 150), (256, 256)]
    samples = []
    for i, (h, w) in enumerate(sizes):
        path = root / "c" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        samples.append(Sample(path, 0))
    cache = DecodedImageCache.for_dataset(root, LITE0, directory=tmp_path / "cache")
    cache.fill([s.path for s in samples])
    transform = build_transforms(LITE0, False)
    cached, plain = ImageFolderDataset(samples, transform, cache), ImageFolderDataset(samples, transform)
    for i in range(len(samples)):
        assert torch.equal(cached[i][0], plain[i][0]), sizes[i]
    assert cache.hits == len(samples)


def _photos() -> list[np.ndarray]:
    """1000 x 800 generated stand-ins for photos (tests/imagefolders.py), with a little sensor-like noise."""
    rng = np.random.default_rng(0)
    photos = []
    for seed in range(3):
        big = photo_like(800, 1000, seed=seed).astype(np.int16)
        photos.append(np.clip(big + rng.normal(0, 4, big.shape), 0, 255).astype(np.uint8))
    return photos


def test_training_crops_differ_from_uncached_within_bound(tmp_path: Path) -> None:
    transform = {"input_size": LITE0["input_size"], "mean": (0, 0, 0), "std": (1, 1, 1),  # outputs in 0..1
                 "interpolation": "bicubic", "crop_pct": 0.875}
    diffs = []
    for i, photo in enumerate(_photos()):
        path = tmp_path / f"{i}.png"
        Image.fromarray(photo).save(path, compress_level=1)
        cache = DecodedImageCache.for_dataset(tmp_path, LITE0, directory=tmp_path / "cache")
        cache.fill([path])
        small = cache.get(path)
        assert small.shape[:2] == (256, 320)
        for scale_min in (0.8, 0.25):
            for seed in range(4):  # same seed: same crop box (as fractions of the image), flip and jitter
                a = build_transforms(transform, True, scale_min=scale_min, seed=seed)(image=photo)["image"]
                b = build_transforms(transform, True, scale_min=scale_min, seed=seed)(image=small)["image"]
                diffs.append(float((a - b).abs().mean()) * 255)
    assert np.mean(diffs) < TRAIN_MEAN_ABS_DIFF, diffs


def test_loader_workers_read_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    write_images(tmp_path / "img", count=8)
    splits = scan_image_folder(tmp_path / "img", val_fraction=0.5)
    dm = ImageFolderDataModule(splits, CONFIG, batch_size=4, num_workers=1, decoded_cache=True)
    plain = ImageFolderDataModule(splits, CONFIG, batch_size=4, num_workers=1)
    assert dm.fill_decoded_cache().added == 8
    assert str(dm.decoded_cache.directory).startswith(str(tmp_path / "cache" / "decoded"))
    # Change a file's pixels behind the cache's back (same size and mtime): only a cache read gives the old ones.
    png = next(s.path for s in splits.val if s.path.suffix == ".png")
    before = [b[0] for b in dm.feature_loader("val")]
    assert all(torch.equal(x, y) for x, y in zip(before, [b[0] for b in plain.feature_loader("val")], strict=True))
    rewrite(png, (0, 0, 0), keep_stat=True)
    after = [b[0] for b in dm.val_dataloader()]
    assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True))  # served by the cache, in a worker
    assert sum(len(b[0]) for b in dm.train_dataloader()) == 4


def test_unreadable_files_take_the_skip_path(tmp_path: Path, cache: DecodedImageCache,
                                             caplog: pytest.LogCaptureFixture) -> None:
    paths = write_images(tmp_path / "img", count=2)
    bad = tmp_path / "img" / "a" / "bad.jpg"
    bad.write_bytes(b"not an image")
    stats = cache.fill([*paths, bad])
    assert (stats.added, stats.failed) == (2, 1)
    dataset = ImageFolderDataset([Sample(bad, 1), Sample(paths[0], 0)], build_transforms(CONFIG, False), cache)
    with caplog.at_level(logging.WARNING, logger="finetune.data"):
        assert dataset[0] == (None, 1, str(bad))
    assert "bad.jpg" in caplog.text
    assert dataset[1][0].shape == (3, 32, 32)


@pytest.mark.parametrize("damage", ["garbage", "wrong_types", "missing_data_file", "truncated_data"])
def test_damaged_cache_is_rebuilt(tmp_path: Path, cache: DecodedImageCache, damage: str) -> None:
    paths = write_images(tmp_path / "img")
    cache.fill(paths)
    index_path = tmp_path / "cache" / "index.json"
    [data] = (tmp_path / "cache").glob("data-*.u8")
    if damage == "garbage":
        index_path.write_bytes(b"\x00{not json")
    elif damage == "wrong_types":
        index = json.loads(index_path.read_text())
        index["entries"] = {k: ["x", None] for k in index["entries"]}
        index_path.write_text(json.dumps(index))
    elif damage == "missing_data_file":
        data.unlink()
    else:
        os.truncate(data, data.stat().st_size // 2)
    fresh = DecodedImageCache(tmp_path / "cache", side=36, interpolation="bicubic")
    assert len(fresh) < 6 and all(fresh.get(p) is None or fresh.get(p).shape[2] == 3 for p in paths)
    stats = fresh.fill(paths)
    assert stats.added + stats.cached == 6 and len(fresh) == 6
    expected = DecodedImageCache(tmp_path / "other", side=36, interpolation="bicubic")
    expected.fill(paths)
    assert all(np.array_equal(fresh.get(p), expected.get(p)) for p in paths)


def _fill_in_child(directory: str, paths: list[str], barrier) -> None:
    barrier.wait()
    DecodedImageCache(directory, side=36, interpolation="bicubic").fill(paths)


def test_concurrent_fills_do_not_corrupt(tmp_path: Path) -> None:
    paths = [str(p) for p in write_images(tmp_path / "img", count=12)]
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(3)
    children = [context.Process(target=_fill_in_child, args=(str(tmp_path / "cache"), part, barrier))
                for part in (paths[:8], paths[4:])]
    for child in children:
        child.start()
    barrier.wait()
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    reader = DecodedImageCache(tmp_path / "cache", side=36, interpolation="bicubic")
    expected = DecodedImageCache(tmp_path / "other", side=36, interpolation="bicubic")
    expected.fill(paths)
    assert len(reader) == 12
    assert all(np.array_equal(reader.get(p), expected.get(p)) for p in paths)


def test_old_reader_survives_a_compaction(tmp_path: Path, cache: DecodedImageCache) -> None:
    paths = write_images(tmp_path / "img")
    cache.fill(paths)
    old = pickle.loads(pickle.dumps(cache))  # as a spawned loader worker would get it
    first = old.get(paths[0])  # maps the current data file
    rewrite(paths[1], (9, 9, 9))
    DecodedImageCache(tmp_path / "cache", side=36, interpolation="bicubic").fill(paths)  # compacts: new file
    np.testing.assert_array_equal(old.get(paths[0]), first)
    assert old.get(paths[1]) is None  # changed since: a miss, never stale pixels


def test_datamodule_rejects_a_bad_cache_argument(tmp_path: Path) -> None:
    write_images(tmp_path / "img")
    with pytest.raises(ValueError, match="decoded_cache"):
        ImageFolderDataModule(scan_image_folder(tmp_path / "img"), CONFIG, decoded_cache="yes")


def test_caches_of_deleted_folders_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    caches = tmp_path / "cache" / "decoded"
    kept, gone = tmp_path / "kept", tmp_path / "gone"
    for root in (gone, kept):
        DecodedImageCache.for_dataset(root, CONFIG).fill(write_images(root, count=2))
    assert len(list(caches.iterdir())) == 2
    for path in gone.rglob("*.*"):
        path.unlink()
    for folder in sorted(gone.rglob("*"), reverse=True):
        folder.rmdir()
    gone.rmdir()
    kept_cache = DecodedImageCache.for_dataset(kept, CONFIG)
    kept_cache.fill([])
    assert list(caches.iterdir()) == [kept_cache.directory]


def test_estimated_bytes_from_headers(tmp_path: Path) -> None:
    """Images smaller than the cache side are stored as they are; larger ones shrink to it (never enlarged)."""
    small = write_images(tmp_path / "small", count=4, size=(20, 20))  # widths 20, 24, 28, 32: all kept whole
    from finetune.data.cache import estimated_bytes
    assert estimated_bytes(small, CONFIG) == sum(20 * (20 + 4 * i) * 3 for i in range(4))
    big = write_images(tmp_path / "big", count=2, size=(360, 360))  # shorter side 360 -> 36
    assert estimated_bytes(big, CONFIG) == 2 * (36 * 36 + 36 * 36) * 3 // 2
    assert estimated_bytes([], CONFIG) == 0


def test_fit_reads_through_the_cache_within_its_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fit`'s plan: on when the folder fits the budget, off beyond it, with the estimate in the reason."""
    from finetune import train
    from finetune.data.splits import load_splits
    write_images(tmp_path / "data", count=8, size=(20, 20))
    splits = load_splits(tmp_path / "data", val_fraction=0.25, seed=0)
    plan = train.decoded_cache_plan(splits, CONFIG)
    assert plan["on"] and 0 < plan["estimated_bytes"] <= plan["budget_bytes"] and plan["reason"].startswith("on")
    monkeypatch.setattr(train, "DEFAULT_BUDGET_BYTES", plan["estimated_bytes"] - 1)
    plan = train.decoded_cache_plan(splits, CONFIG)
    assert not plan["on"] and plan["reason"].startswith("off")


@pytest.mark.parametrize("workers", [0, 1])
def test_filling_leaves_the_global_rng_alone(tmp_path: Path, workers: int) -> None:
    """A run that fills the cache must draw the same augmentation and dropout as one that finds it filled."""
    paths = write_images(tmp_path / "data", count=4)
    cache = DecodedImageCache(tmp_path / "cache", side=36)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    assert cache.fill(paths, workers=workers).added == 4
    assert torch.equal(torch.get_rng_state(), state)

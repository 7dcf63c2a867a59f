"""Decoded-image cache: decode and downscale each image once, serve later epochs from a memory-mapped file.

Decoding a JPEG and shrinking it is most of the data work of a CPU epoch (a 1000 x 800 JPEG: 4.8 ms to decode
and 2.4 ms for the random crop, against 0.55 ms for the same crop of a cached 320 x 256 image; see
`scripts/bench_train.py`). The cache keeps each image as `load_rgb` decodes it, downscaled (never upscaled) so
that its shorter side is `cache_side(data_config)`, as uint8 pixels in one memory-mapped file. A JSON index
maps each absolute path to ``[size, mtime_ns, offset, height, width]``; a file whose size or modification
time changed is a miss, is decoded from the original again, and is stored again by the next `fill`.

When it is filled, and why: once per run, in the main process, before any loader starts (`fill`, called by
the datamodule when it builds its first loader). Decoding runs in `DataLoader` worker processes; the main
process appends the pixels and then replaces the index. Loader workers, forked afterwards, only read, so
nothing needs a lock on the read path and a worker can never see a half-written entry. Filling lazily from
inside the workers would need a shared, locked, growing index. Filling first costs about what the first epoch
spends decoding anyway, plus the Pillow resize that keeps eval exact (7 ms for 1000 x 800): in
`bench/train.json` the first epoch takes 1.3 uncached epochs, and every later one, in this run or the next,
0.14 of one.

Concurrent runs on the same folder: writers take an exclusive `flock` on ``lock`` and re-read the index
under it; pixels are only ever appended, the index is replaced atomically (temporary file + rename), and a
compaction writes a new data file (``data-<random>.u8``) instead of rewriting one in place, so a reader
holding an older index keeps reading the file that index describes. A missing, damaged or foreign index is
an empty cache: the next `fill` starts a new data file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import secrets
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .. import caches
from ..errors import ImageDecodeError
from ..files import atomic_write_text, cache_dir
from .images import load_rgb
from .transforms import eval_resize_size, parse_data_config, shrink_short_side

try:
    import fcntl
except ImportError:  # Windows: no flock, so the cache is read-only there (it is never filled)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("finetune.data")

INDEX_VERSION = 1
DEFAULT_BUDGET_BYTES = 2 * 1024**3  # 2 GiB: about 8,500 images of 256 x 320 pixels
_INDEX = "index.json"


def cache_side(data_config: Mapping[str, Any]) -> int:
    """The shorter side, in pixels, that cached images are downscaled to for one backbone's data config.

    It is the eval transform's resize size, floor(input / crop_pct) (256 for a 224 input at crop_pct 0.875),
    and never less than the input size:
    - eval: `ResizeCenterCrop` then resizes nothing, so validation, test and cached-feature tensors are
      bit-identical to the uncached ones (tests/data/test_cache.py checks it);
    - training: `RandomResizedCrop` draws its box as fractions of the image, so it crops the same region as
      from the original; only the resampling differs. Measured on 1000 x 800 photos (lite0: 224 px, bicubic,
      same seeds): mean absolute difference 3-4 grey levels of 255 for scale_min 0.08-0.8, about 13% less
      gradient energy. That comes from resampling twice (crops a little larger than 224 px shrink by ~1.1x)
      and from upsampling crops smaller than 224 px; a crop over the eval region is as sharp as the eval
      image. Storing 384 px would keep 91-94% of the sharpness but cost 2.25x the space, slow each crop
      (0.70 vs 0.43 ms) and make eval only near-identical (0.45 levels); the ImageNet convention of
      training from images pre-resized to 256 px makes the same trade.
    """
    cfg = parse_data_config(data_config)
    return max(*eval_resize_size(cfg.size, cfg.crop_pct), *cfg.size)


def estimated_bytes(paths: Sequence[str | os.PathLike[str]], data_config: Mapping[str, Any], sample: int = 200,
                    seed: int = 0) -> int:
    """What a filled cache of ``paths`` would hold, from the headers of a seeded sample of them (nothing
    decoded): the mean stored size (shorter side shrunk to ``cache_side``, never enlarged) times their number."""
    if not paths:
        return 0
    side = cache_side(data_config)
    sizes = []
    for path in random.Random(seed).sample(list(paths), min(sample, len(paths))):
        try:
            with Image.open(path) as img:
                w, h = img.size
        except OSError:
            continue  # the pre-flight check has already named unreadable files
        scale = min(1.0, side / min(w, h))
        sizes.append(round(w * scale) * round(h * scale) * 3)
    return int(sum(sizes) / len(sizes) * len(paths)) if sizes else 0


@dataclass(frozen=True)
class FillStats:
    """What one `DecodedImageCache.fill` did."""

    requested: int  # distinct paths asked for
    cached: int  # already valid in the cache
    added: int  # decoded and stored now
    failed: int  # could not be decoded (left to the dataset's skip path)
    over_budget: int  # decoded every time instead: the budget was full
    dropped: int  # stale entries removed (file changed or gone)


class DecodedImageCache:
    """Decoded, downscaled uint8 images of one dataset in a memory-mapped file, keyed by path, size and mtime.

    ``get(path)`` returns the cached pixels or None; ``load(path)`` falls back to `load_rgb` (the full-size
    original, as without a cache). ``fill(paths)`` decodes what is missing or stale. At most ``budget_bytes``
    of pixels are kept; images beyond it are decoded every time. Picklable, and safe to use from `DataLoader`
    workers (each process maps the file itself).
    """

    def __init__(self, directory: str | os.PathLike[str], side: int, interpolation: str = "bilinear",
                 budget_bytes: int = DEFAULT_BUDGET_BYTES, root: str | os.PathLike[str] | None = None) -> None:
        if not (isinstance(side, int) and side > 0):
            raise ValueError(f"side must be a positive number of pixels, got {side!r}")
        if not (isinstance(budget_bytes, int) and budget_bytes >= 0):
            raise ValueError(f"budget_bytes must be an integer >= 0 (0 stores nothing), got {budget_bytes!r}")
        self.directory = Path(directory)
        self.side = side
        self.interpolation = interpolation
        self.budget_bytes = budget_bytes
        self.root = None if root is None else os.path.abspath(root)  # recorded, so a stale cache can be found
        self.hits = 0  # counted in this process only
        self.misses = 0
        self._index: dict[str, Any] | None = None  # read lazily
        self._data: np.ndarray | None = None  # the memory map, opened lazily in each process

    @classmethod
    def for_dataset(cls, root: str | os.PathLike[str], data_config: Mapping[str, Any], *,
                    budget_bytes: int = DEFAULT_BUDGET_BYTES, directory: str | os.PathLike[str] | None = None
                    ) -> DecodedImageCache:
        """The cache of one dataset root for one backbone's preprocessing, under
        ``$FINETUNE_CACHE/decoded/`` (default: the user cache directory) unless ``directory`` is given.
        Filling a cache in that default place also deletes the caches there whose dataset folder is gone."""
        side = cache_side(data_config)
        interpolation = parse_data_config(data_config).interpolation
        if directory is None:
            key = hashlib.sha256(os.fsencode(os.path.abspath(root))).hexdigest()[:16]
            directory = cache_dir() / "decoded" / f"{key}-{side}-{interpolation}"
        return cls(directory, side, interpolation, budget_bytes, root)

    # --- reading ------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries())

    @property
    def nbytes(self) -> int:
        """Bytes of pixels held for the current entries."""
        return sum(_nbytes(e) for e in self._entries().values())

    def get(self, path: str | os.PathLike[str]) -> np.ndarray | None:
        """The cached (H, W, 3) uint8 pixels of ``path`` (a private, writable copy), or None when it is not
        cached or the file's size or modification time changed since."""
        key = os.path.abspath(path)
        entry = self._entries().get(key)
        pixels = self._read(key, entry) if entry is not None else None
        if pixels is None:
            self.misses += 1
        else:
            self.hits += 1
        return pixels

    def load(self, path: str | os.PathLike[str]) -> np.ndarray:
        """``get(path)``, or on a miss the original decoded by `load_rgb` (which raises `ImageDecodeError`)."""
        pixels = self.get(path)
        return load_rgb(path) if pixels is None else pixels

    def _read(self, key: str, entry: list[int]) -> np.ndarray | None:
        size, mtime_ns, offset, height, width = entry
        try:
            stat = os.stat(key)
        except OSError:
            return None
        if stat.st_size != size or stat.st_mtime_ns != mtime_ns:
            return None
        data = self._mapped()
        end = offset + height * width * 3
        if data is None or end > data.shape[0]:
            return None
        return np.array(data[offset:end]).reshape(height, width, 3)

    def _entries(self) -> dict[str, list[int]]:
        if self._index is None:
            self._index = self._read_index()
        return self._index["entries"]

    def _mapped(self) -> np.ndarray | None:
        if self._data is None:
            name = self._index["data"] if self._index else None
            try:
                self._data = np.memmap(self.directory / name, dtype=np.uint8, mode="r") if name else None
            except (OSError, ValueError):  # removed by another run's compaction, or empty
                self._index, self._data = self._read_index(), None
                return None
        return self._data

    def _read_index(self) -> dict[str, Any]:
        """The index on disk, with only well-formed entries that lie inside its data file; else empty."""
        empty = {"version": INDEX_VERSION, "side": self.side, "interpolation": self.interpolation,
                 "root": self.root, "data": None, "entries": {}}
        try:
            index = json.loads((self.directory / _INDEX).read_text(encoding="ascii"))
            if Path(index["data"]).name != index["data"]:
                raise ValueError(f"data file {index['data']!r} is not a file name")
            data_size = (self.directory / index["data"]).stat().st_size
            if (index["version"], index["side"], index["interpolation"]) != (INDEX_VERSION, self.side,
                                                                             self.interpolation):
                return empty
            entries = {k: v for k, v in index["entries"].items() if _well_formed(v, data_size)}
            return {**empty, "data": index["data"], "entries": entries}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            if not isinstance(exc, FileNotFoundError):
                log.warning("decoded-image cache %s: unreadable index (%s); it will be rebuilt", self.directory, exc)
            return empty

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_data": None}  # a memory map does not pickle; each process opens its own

    # --- filling ------------------------------------------------------------------------------------------

    def fill(self, paths: Iterable[str | os.PathLike[str]], *, workers: int = 0) -> FillStats:
        """Decode and store every path that is not cached or changed, in ``workers`` loader processes
        (0: in this process), until the budget is full. Entries of files that changed or disappeared are
        dropped. Failures to write (read-only cache folder, full disk) are logged, never raised."""
        wanted = list(dict.fromkeys(os.path.abspath(p) for p in paths))
        if fcntl is None:
            return FillStats(len(wanted), 0, 0, 0, 0, 0)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with _locked(self.directory / "lock"):
                stats = self._fill_locked(wanted, workers)
            if self.root is not None and self.directory.parent == cache_dir() / "decoded":
                _remove_orphans(self.directory.parent)
                os.utime(self.directory)  # used now: pruning drops the least recently used datasets first
                caches.prune("decoded", keep=self.directory)
            return stats
        except OSError as exc:
            log.warning("decoded-image cache %s not filled (%s); images are decoded every time", self.directory,
                        exc)
            return FillStats(len(wanted), 0, 0, 0, 0, 0)
        finally:
            self._data = None  # the file may have grown or been replaced: map it again on the next read

    def _fill_locked(self, wanted: list[str], workers: int) -> FillStats:
        self._data = None
        index = self._read_index()  # another run may have filled it while we waited for the lock
        stats = {p: _stat_key(p) for p in {*wanted, *index["entries"]}}
        live = {p: e for p, e in index["entries"].items() if stats[p] == tuple(e[:2])}
        dropped = len(index["entries"]) - len(live)
        todo = [p for p in wanted if p not in live and stats[p] is not None]
        cached = sum(p in live for p in wanted)
        used = sum(_nbytes(e) for e in live.values())
        data_path = self.directory / index["data"] if index["data"] else None
        on_disk = data_path.stat().st_size if data_path is not None and data_path.exists() else None
        changed = on_disk is None or (on_disk > used and bool(todo or dropped))
        if changed:  # no data file yet, or stale bytes to reclaim before adding: start a new file
            index = self._compact(index, live)
        else:
            index["entries"] = live
        added = failed = over = 0
        if todo:
            added, failed, over = self._append(index, todo, workers, used)
        if changed or added or dropped:
            self._write_index(index)
        self._index = index
        if added:
            log.info("decoded-image cache %s: %d image(s) added, %.0f MB in all", self.directory, added,
                     self.nbytes / 1e6)
        return FillStats(len(wanted), cached, added, failed, over, dropped)

    def _compact(self, index: dict[str, Any], live: dict[str, list[int]]) -> dict[str, Any]:
        """Copy the live entries into a new data file and delete every other one. A data file is never
        rewritten or truncated in place: another process may have it mapped (truncation would crash it)."""
        name = f"data-{secrets.token_hex(6)}.u8"
        old_path = self.directory / index["data"] if index["data"] else None
        old = np.memmap(old_path, dtype=np.uint8, mode="r") if live and old_path is not None else None
        moved: dict[str, list[int]] = {}
        with open(self.directory / name, "xb") as out:
            for key, (size, mtime_ns, start, height, width) in live.items() if old is not None else ():
                moved[key] = [size, mtime_ns, out.tell(), height, width]
                out.write(memoryview(old[start:start + height * width * 3]))
        del old
        for stale in self.directory.glob("data-*.u8"):
            if stale.name != name:
                stale.unlink(missing_ok=True)  # readers that mapped it keep their mapping
        return {**index, "data": name, "entries": moved}

    def _append(self, index: dict[str, Any], todo: list[str], workers: int, used: int) -> tuple[int, int, int]:
        """Decode ``todo`` and append the pixels to the data file until the budget is full;
        returns (added, failed, over budget)."""
        if used >= self.budget_bytes:
            return 0, 0, len(todo)
        added = failed = 0
        with open(self.directory / index["data"], "ab") as out:
            try:
                for i, (key, stat, pixels) in enumerate(_decoded(todo, self.side, self.interpolation, workers)):
                    if pixels is None:
                        failed += 1
                    elif used + pixels.nbytes > self.budget_bytes:
                        return added, failed, len(todo) - i
                    else:
                        index["entries"][key] = [*stat, out.tell(), pixels.shape[0], pixels.shape[1]]
                        out.write(memoryview(pixels).cast("B"))
                        used += pixels.nbytes
                        added += 1
            finally:
                out.flush()
                os.fsync(out.fileno())  # the pixels reach the disk before an index that points at them
        return added, failed, 0

    def _write_index(self, index: dict[str, Any]) -> None:
        # ensure_ascii: file names that are not valid UTF-8 survive as \\udcXX escapes
        atomic_write_text(self.directory / _INDEX, json.dumps(index))
        self._index, self._data = index, None


def _remove_orphans(parent: Path) -> None:
    """Delete the caches in ``parent`` whose dataset folder is gone (temporary folders would pile up)."""
    for index_path in parent.glob(f"*/{_INDEX}"):
        try:
            root = json.loads(index_path.read_text(encoding="ascii")).get("root")
            if isinstance(root, str) and not os.path.exists(root):
                shutil.rmtree(index_path.parent)
        except (OSError, ValueError, AttributeError):
            continue  # another run's business; never fail a fill over it


def _well_formed(entry: Any, data_size: int) -> bool:
    return (isinstance(entry, list) and len(entry) == 5 and all(type(v) is int and v >= 0 for v in entry)
            and entry[2] + _nbytes(entry) <= data_size)


def _nbytes(entry: list[int]) -> int:
    return entry[3] * entry[4] * 3


def _stat_key(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class _Decode(Dataset):
    """Item i: (path, (size, mtime_ns) read before decoding, downscaled pixels or None)."""

    def __init__(self, paths: Sequence[str], side: int, interpolation: str) -> None:
        self.paths, self.side, self.interpolation = paths, side, interpolation

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[str, tuple[int, int] | None, np.ndarray | None]:
        path = self.paths[i]
        stat = _stat_key(path)  # before decoding: a file rewritten meanwhile then reads as changed
        try:
            pixels = shrink_short_side(load_rgb(path), self.side, self.interpolation)
        except ImageDecodeError:
            return path, stat, None
        return path, stat, np.ascontiguousarray(pixels)


def _as_is(item: Any) -> Any:
    return item  # numpy arrays cross the process boundary pickled, not through /dev/shm tensors


def _decoded(paths: Sequence[str], side: int, interpolation: str, workers: int
             ) -> Iterator[tuple[str, tuple[int, int], np.ndarray | None]]:
    # its own generator: a loader draws its workers' base seed when iterated, and a draw from the global RNG
    # would make a run that fills the cache train differently from one that finds it filled
    loader = DataLoader(_Decode(paths, side, interpolation), batch_size=None, num_workers=workers,
                        collate_fn=_as_is, generator=torch.Generator())
    for path, stat, pixels in loader:
        yield path, stat, (pixels if stat is not None else None)

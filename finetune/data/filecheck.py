"""Per-file checks for `doctor`: can the file be decoded, what will decoding change, its content and
perceptual hashes. Checks run in parallel processes and are cached by path, size and modification time.

`check_file(path)` never raises: every problem becomes a `(kind, message)` pair of `FileCheck.issues`, with
the kinds of `doctor.KINDS`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image

from .. import caches
from ..errors import ImageDecodeError
from ..files import atomic_write_text, cache_dir, hash_file
from .images import MAX_PIXELS, check_pixel_count, load_rgb

MIN_SIDE = 32
"""Images with a side shorter than this many pixels are reported as `too_small`: they are upscaled a lot."""
MAX_ASPECT_RATIO = 4.0
"""Longer side / shorter side above this is an `extreme_aspect`: the centre crop keeps a quarter or less."""
HASH_SIZE = 8
"""The perceptual hash keeps the 8 x 8 lowest frequencies of the DCT of a 32 x 32 grey thumbnail: 64 bits."""
FEATURELESS_STD = 2.0
"""Thumbnails with less grey-level spread than this (flat colours) get no perceptual hash: any two flat
images would look identical to it."""
CACHE_VERSION = 1

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F"})
_EXIF_ORIENTATION = ExifTags.Base.Orientation
# Formats Pillow cannot read, recognised by their first bytes, so that "unsupported format" is told apart
# from "not an image at all".
_UNSUPPORTED_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (4, b"ftypheic", "HEIC"), (4, b"ftypheix", "HEIC"), (4, b"ftyphevc", "HEIC"), (4, b"ftypmif1", "HEIF"),
    (4, b"ftypmsf1", "HEIF"), (4, b"ftypavif", "AVIF"), (4, b"ftypavis", "AVIF"), (4, b"ftypcrx ", "Canon CR3"),
    (0, b"\xff\x0a", "JPEG XL"), (0, b"\x00\x00\x00\x0cJXL ", "JPEG XL"), (0, b"%PDF", "PDF"),
    (0, b"<svg", "SVG"), (0, b"<?xml", "SVG/XML"), (0, b"8BPS", "Photoshop"), (0, b"FUJIFILMCCD-RAW", "RAF"),
)


@dataclass
class FileCheck:
    """What `check_file` learnt about one file. JSON-ready (it is cached)."""

    issues: list[tuple[str, str]] = field(default_factory=list)  # (kind, message)
    readable: bool = False
    width: int = 0
    height: int = 0
    digest: str | None = None  # BLAKE2b of the bytes, for exact duplicates
    phash: int | None = None  # 64-bit perceptual hash of the decoded image, None when flat or unreadable

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FileCheck:
        return cls(**{**data, "issues": [tuple(pair) for pair in data["issues"]]})


def check_file(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS) -> FileCheck:
    """Check one file as `load_rgb` will see it. Never raises."""
    path = Path(path)
    try:
        head = _read_head(path)
    except OSError as exc:
        kind = "permission_denied" if isinstance(exc, PermissionError) else "unreadable"
        return FileCheck([(kind, f"cannot open the file ({exc.strerror or exc})")])
    if not head:
        return FileCheck([("empty_file", "the file is empty (0 bytes)")])
    header = _read_header(path)
    if header is not None:
        try:
            check_pixel_count(header["size"], path, max_pixels)
        except ImageDecodeError as exc:
            return FileCheck([("decompression_bomb", exc.reason)])
    try:
        rgb = load_rgb(path)
    except ImageDecodeError as exc:
        return FileCheck([_unreadable(exc, head)])
    height, width = rgb.shape[:2]
    issues = _conversions(header) + _geometry(width, height)
    return FileCheck(issues, True, width, height, _digest(path), perceptual_hash(rgb))


def _read_head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(32)


def _read_header(path: Path) -> dict[str, Any] | None:
    """Mode, size, format, frames and orientation from the header alone (no pixel data is decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: the limit is ours, checked next
            with Image.open(path) as img:
                return {
                    "size": img.size,
                    "mode": img.mode,
                    "format": img.format or "",
                    "animated": bool(getattr(img, "is_animated", False)),
                    "orientation": _orientation(img),
                    "rawmode": " ".join(str(tile[3]) for tile in getattr(img, "tile", []) or []),
                }
    except Exception:  # noqa: BLE001 - load_rgb reports the failure with its reason
        return None


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block: load_rgb ignores it too
        return 1


def _unreadable(exc: ImageDecodeError, head: bytes) -> tuple[str, str]:
    if exc.kind == "not_an_image":
        fmt = _unsupported_format(head)
        if fmt:
            return "unsupported_format", f"{fmt} data, which Pillow cannot decode"
        return "not_an_image", f"no known image format in the first bytes ({head[:8]!r})"
    return exc.kind, exc.reason


def _unsupported_format(head: bytes) -> str | None:
    for offset, signature, name in _UNSUPPORTED_SIGNATURES:
        if head[offset : offset + len(signature)] == signature:
            return name
    return None


def _conversions(header: dict[str, Any] | None) -> list[tuple[str, str]]:
    """What `load_rgb` changes on the way to 8-bit RGB: worth knowing, nothing to fix."""
    if header is None:
        return []
    mode, fmt, issues = header["mode"], header["format"], []
    if mode in _SIXTEEN_BIT_MODES or ";16" in header["rawmode"]:
        issues.append(("16_bit", f"16-bit {fmt} ({mode}), scaled to 8 bit"))
    elif mode in _GREY_MODES:
        issues.append(("grayscale", f"single channel ({mode}), repeated to RGB"))
    elif mode in ("P", "PA") and fmt != "GIF":  # every GIF is a palette image: not news
        issues.append(("palette", f"palette image ({mode}), converted to RGB"))
    elif mode in ("RGBA", "RGBa"):
        issues.append(("rgba", "has an alpha channel: transparent parts become white"))
    elif mode == "CMYK":
        issues.append(("cmyk", "CMYK colours, converted to RGB (colours may shift slightly)"))
    if header["orientation"] not in (0, 1):
        issues.append(("exif_rotated", f"EXIF orientation {header['orientation']}: rotated upright when read"))
    if header["animated"]:
        issues.append(("animated", f"animated {fmt}: only the first frame is used"))
    return issues


def _geometry(width: int, height: int) -> list[tuple[str, str]]:
    issues = []
    if min(width, height) < MIN_SIDE:
        issues.append(("too_small", f"{width} x {height} pixels, under {MIN_SIDE} on a side"))
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        ratio = max(width, height) / max(1, min(width, height))
        issues.append(("extreme_aspect", f"{width} x {height} pixels, aspect ratio {ratio:.1f}:1"))
    return issues


def _digest(path: Path) -> str | None:
    """A short key for finding byte-identical files: BLAKE2b, fast in software, and 128 bits are plenty to
    tell files apart (`files.sha256_file` is for checksums that others verify)."""
    try:
        return hash_file(path, hashlib.blake2b(digest_size=16))
    except OSError:  # it was readable a moment ago; without a digest it is just not compared
        return None


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    matrix = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * np.sqrt(2 / n)
    matrix[0] /= np.sqrt(2)
    return matrix


_DCT32 = _dct_matrix(32)


def perceptual_hash(rgb: np.ndarray) -> int | None:
    """pHash: bits of the 8 x 8 lowest DCT frequencies of a 32 x 32 grey thumbnail above their median.

    Re-encoding, resizing or small edits move few of its 64 bits; unrelated photos differ in about 32.
    Returns None for flat images, which it cannot tell apart.
    """
    thumb = Image.fromarray(rgb).convert("L").resize((32, 32), Image.Resampling.BOX, reducing_gap=2.0)
    grey = np.asarray(thumb, dtype=np.float64)
    if grey.std() < FEATURELESS_STD:
        return None
    low = (_DCT32 @ grey @ _DCT32.T)[:HASH_SIZE, :HASH_SIZE].ravel()
    bits = low > np.median(low)
    return int(np.packbits(bits).view(">u8")[0])


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


# --- running many checks: cache + processes ---------------------------------------------------------------


class CheckCache:
    """`FileCheck`s of one dataset keyed by absolute path, valid while size and mtime are unchanged.

    One JSON file per dataset root under `cache_dir()/doctor/`; a missing, stale or damaged file is just
    an empty cache. `path=None` makes a cache that remembers nothing.
    """

    def __init__(self, path: Path | None, settings: dict[str, Any]) -> None:
        self.path = path
        self.settings = settings
        self.entries: dict[str, list[Any]] = {}
        self.hits = 0
        self.changed = False
        if path is not None:
            self.entries = self._read(path)

    @classmethod
    def for_root(cls, root: Path, enabled: bool = True, max_pixels: int = MAX_PIXELS) -> CheckCache:
        settings = {"version": CACHE_VERSION, "max_pixels": max_pixels, "min_side": MIN_SIDE,
                    "max_aspect": MAX_ASPECT_RATIO}
        if not enabled:
            return cls(None, settings)
        key = hashlib.sha256(os.fsencode(root.absolute())).hexdigest()[:20]
        return cls(cache_dir() / "doctor" / f"{key}.json", settings)

    def get(self, path: str, stat: os.stat_result) -> FileCheck | None:
        entry = self.entries.get(path)
        if entry is None or entry[0] != stat.st_size or entry[1] != stat.st_mtime_ns:
            return None
        self.hits += 1
        return FileCheck.from_dict(entry[2])

    def put(self, path: str, stat: os.stat_result, check: FileCheck) -> None:
        self.entries[path] = [stat.st_size, stat.st_mtime_ns, asdict(check)]
        self.changed = True

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        try:
            # ensure_ascii: file names that are not valid UTF-8 survive as \\udcXX escapes
            atomic_write_text(self.path, json.dumps({"settings": self.settings, "files": self.entries}))
            caches.prune("doctor", keep=self.path)
        except OSError:
            pass  # a read-only cache dir costs speed, not correctness

    def _read(self, path: Path) -> dict[str, list[Any]]:
        try:
            data = json.loads(path.read_text(encoding="ascii"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("settings") != self.settings:
            return {}
        with contextlib.suppress(OSError):
            os.utime(path)  # used now: the cache's pruning drops the least recently used datasets first
        files = data.get("files")
        return files if isinstance(files, dict) else {}


def check_files(
    paths: Sequence[Path],
    cache: CheckCache,
    *,
    workers: int | None = None,
    max_pixels: int = MAX_PIXELS,
    on_progress: Callable[[int], None] | None = None,
) -> dict[Path, FileCheck]:
    """`check_file` for every path, from the cache where size and mtime match, else in `workers` processes
    (default: one per CPU; 0 checks in this process)."""
    results: dict[Path, FileCheck] = {}
    todo: list[tuple[Path, os.stat_result | None]] = []
    for path in paths:
        stat = _stat(path)
        cached = cache.get(str(path), stat) if stat is not None else None
        if cached is not None:
            results[path] = cached
        else:
            todo.append((path, stat))
    if on_progress and len(results):
        on_progress(len(results))
    for (path, stat), check in zip(todo, _run(todo, workers, max_pixels, on_progress), strict=True):
        results[path] = check
        if stat is not None:
            cache.put(str(path), stat, check)
    cache.save()
    return results


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


def _run(
    todo: list[tuple[Path, Any]], workers: int | None, max_pixels: int, on_progress: Callable[[int], None] | None
) -> Iterable[FileCheck]:
    workers = _cpu_count() if workers is None else workers
    paths = [path for path, _ in todo]
    if workers <= 1 or len(paths) < 64:  # process start-up costs more than a few dozen small files
        results: Iterable[FileCheck] = (check_file(p, max_pixels) for p in paths)
        for check in results:
            if on_progress:
                on_progress(1)
            yield check
        return
    chunksize = max(1, min(64, len(paths) // (workers * 8)))
    with concurrent.futures.ProcessPoolExecutor(workers, initializer=_quiet_worker) as pool:
        for check in pool.map(check_file, paths, [max_pixels] * len(paths), chunksize=chunksize):
            if on_progress:
                on_progress(1)
            yield check


def _quiet_worker() -> None:
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1

"""Decode any image file a user is likely to have into 8-bit RGB, or raise one named error.

Every failure becomes `ImageDecodeError(path, reason)` so callers (the dataset, `doctor`) can skip and
report a bad file instead of crashing a training run on the 40,000th image.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from ..errors import ImageDecodeError

logger = logging.getLogger("finetune.data")

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)
"""Lower-case suffixes (with the dot) that count as images; compare with `path.suffix.lower()`."""

MAX_PIXELS = 178_956_970
"""Images with more pixels (about 13,400 x 13,400) are refused from their header, before any decoding: a
few kilobytes of compressed data can otherwise expand to gigabytes (a decompression bomb). This is Pillow's
own hard limit, twice its default `Image.MAX_IMAGE_PIXELS`, fixed here so a changed global cannot lift it."""

_WHITE = (255, 255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "LA", "La", "RGBa", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True when the file name has one of `IMAGE_EXTENSIONS` (case-insensitive); the content is not read."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def load_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as an (H, W, 3) uint8 RGB array, upright as a viewer shows it.

    Applies the EXIF orientation, composites transparency on white, takes the first frame of an animation
    and rescales 16-bit and float images to 8 bit. Raises `ImageDecodeError` (and nothing else) for
    missing, empty, truncated, unreadable or oversized files; its `kind` says which.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageDecodeError(path, "empty file (0 bytes)", "empty_file")
        with Image.open(path) as img:  # reads the header only
            check_pixel_count(img.size, path)
            # Decode every byte now: Pillow is lazy, and a truncated file only fails on load().
            img.load()
            return _to_rgb_array(_upright(img, path))
    except ImageDecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - the contract is one error type for any bad file
        kind, reason = _failure(exc)
        raise ImageDecodeError(path, reason, kind) from exc


def check_pixel_count(size: tuple[int, int], path: str | os.PathLike[str], max_pixels: int | None = None) -> None:
    """Raise `ImageDecodeError` (kind "decompression_bomb") when a (width, height) from a header has more
    than `max_pixels` (default `MAX_PIXELS`) pixels."""
    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    width, height = size
    if width * height > max_pixels:
        raise ImageDecodeError(
            path,
            f"{width} x {height} = {width * height:,} pixels, over the limit of {max_pixels:,}: refused "
            "without decoding (decompression bomb check)",
            "decompression_bomb",
        )


def _upright(img: Image.Image, path: Path) -> Image.Image:
    """Rotate/flip as the EXIF orientation tag says; a broken EXIF block is not worth losing the image."""
    try:
        # exif_transpose copies the image even when there is nothing to do; most photos are upright.
        if img.getexif().get(ExifTags.Base.Orientation, 1) in (None, 1):
            return img
        return ImageOps.exif_transpose(img)
    except Exception as exc:  # noqa: BLE001 - EXIF parsing can fail in many ways; pixels are still good
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", path, exc)
        return img


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    """Convert any Pillow mode to a contiguous (H, W, 3) uint8 array."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES or mode in {"I", "F"}:
        gray = _high_depth_to_uint8(np.asarray(img), mode)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        img = _on_white(img.convert("RGBA"))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def _on_white(rgba: Image.Image) -> Image.Image:
    """Composite on white: transparent regions of logos and product shots are meant to read as paper."""
    background = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Scale 16-bit, 32-bit integer and float single-channel data to 0..255 (scaled, not clipped).

    16-bit modes map 0..65535 linearly onto 0..255. Mode "I" holding 0..65535 is 16-bit data as older Pillow
    versions open it. Float data in 0..1 is scaled by 255. Anything else (e.g. raw sensor counts) is
    min-max stretched, the only mapping that keeps the picture visible.
    """
    data = values.astype(np.float64)
    finite = np.isfinite(data)
    data = np.where(finite, data, 0.0)
    lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if mode in _SIXTEEN_BIT_MODES or (mode == "I" and lo >= 0 and hi <= 65535):
        scaled = data * (255.0 / 65535.0)
    elif mode == "F" and lo >= 0 and hi <= 1:
        scaled = data * 255.0
    elif hi > lo:
        scaled = (data - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(data)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _failure(exc: BaseException) -> tuple[str, str]:
    """The kind (a `finetune.data.doctor.KINDS` name) and a short human reason for a decode failure."""
    message = str(exc)
    lowered = message.lower()
    if isinstance(exc, PermissionError):
        return "permission_denied", "permission denied (make the file readable)"
    if isinstance(exc, FileNotFoundError):
        return "unreadable", "file not found"
    if isinstance(exc, IsADirectoryError):
        return "unreadable", "is a directory, not an image file"
    if isinstance(exc, Image.DecompressionBombError):  # Pillow's check on the header, before decoding
        pixels = re.search(r"\((\d+) pixels\)", message)
        count = f"{int(pixels.group(1)):,} pixels" if pixels else "too many pixels"
        return "decompression_bomb", f"{count}: refused without decoding (decompression bomb check)"
    if isinstance(exc, UnidentifiedImageError):
        return "not_an_image", "not an image Pillow can read (wrong extension, unsupported format or garbage bytes)"
    if "truncated" in lowered:
        return "truncated", "truncated file (the image data ends early)"
    if isinstance(exc, MemoryError):
        return "unreadable", "out of memory while decoding"
    if "broken data stream" in lowered:  # Pillow's message when the decoder rejects the compressed data
        return "corrupt", "corrupt image data (the decoder rejected the compressed data)"
    return "corrupt", f"corrupt or unsupported image data ({type(exc).__name__}: {message})"

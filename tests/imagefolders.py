"""Tiny generated image folders (real PNG/JPEG files on disk) for tests; imported by tests/conftest.py and
by test modules that need folders in module-scoped fixtures (a unique module name: every conftest.py is
called `conftest`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200), "yellow": (220, 210, 40)}


def make_image_folder(root: Path, classes: int = 3, per_class: int = 8, size: int = 48, seed: int = 0,
                      split: bool = False) -> Path:
    """``root/<colour>/<i>.png`` (or ``root/{train,val}/<colour>/...``): noisy images whose class is their
    dominant colour, so that even a tiny random network can learn it."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)[:classes]
    for name in names:
        for i in range(per_class):
            part = ("val" if i % 4 == 0 else "train") if split else ""
            folder = root / part / name
            folder.mkdir(parents=True, exist_ok=True)
            noise = rng.normal(0, 30, (size, size, 3))
            pixels = np.clip(np.array(COLOURS[name]) + noise, 0, 255).astype(np.uint8)
            suffix = ".jpg" if i % 2 else ".png"
            Image.fromarray(pixels).save(folder / f"{i}{suffix}")
    return root


def photo_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An (H, W, 3) uint8 stand-in for a photograph: smooth colour regions at several scales (a random 6x8
    and 24x32 grid, upscaled bicubically) plus fine texture, so resizing and cropping behave as on a photo."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.float32)
    for grid, weight in (((6, 8), 0.6), ((24, 32), 0.3)):
        coarse = rng.integers(0, 256, (*grid, 3), dtype=np.uint8)
        image += weight * np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    image += rng.normal(0, 0.1 * 255 / 3, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)

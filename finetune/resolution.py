"""The input resolution of recipes that train the backbone, from the images' native size.

Every timm backbone has a pretraining resolution (224 px for ``tf_efficientnet_lite0``), and resizing 28-pixel
images up to it costs compute without adding information: a training step at 224 px costs about 12x one at
64 px. A frozen backbone needs its pretraining scale (a probe loses accuracy at lower resolutions), but a
network that is fine-tuned adapts to the new scale (Touvron et al. 2019, "Fixing the train-test resolution
discrepancy"). So recipes that train the backbone run at ``UPSCALE`` x the images' native side (their median
shorter side), rounded up to a multiple of 32 and kept between ``MIN_SIDE`` and the backbone's own; the probe-only
recipes keep the backbone's. ``resolution = N`` in a recipe sets it.

The side chosen is written into the run's data config (``config.json`` ``pretrained_cfg.input_size``), which
the export, ``predict`` and ``evaluate`` read: a model trained at 64 px is served at 64 px.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass
from typing import Any

from PIL import Image

from .data import DatasetSplits
from .recipes import Recipe

UPSCALE = 2.0  # training side / native side (docs/benchmarks.md, "Resolution")
MIN_SIDE = 64
SAMPLE = 200  # training images whose header is read for the native size


@dataclass(frozen=True)
class Resolution:
    side: int  # what the model trains and runs at
    native: int | None  # the images' median shorter side (None when not measured)
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"side": self.side, "native": self.native, "reason": self.reason}


def native_side(splits: DatasetSplits, seed: int = 0) -> int:
    """The median shorter side of a seeded sample of training images, from their headers (nothing decoded)."""
    sample = random.Random(seed).sample(splits.train, min(SAMPLE, len(splits.train)))
    sides = []
    for s in sample:
        try:
            with Image.open(s.path) as img:
                sides.append(min(img.size))
        except OSError:
            continue  # the pre-flight check has already named unreadable files
    return int(statistics.median(sides)) if sides else 0


def choose_resolution(recipe: Recipe, splits: DatasetSplits, backbone_side: int, seed: int = 0) -> Resolution:
    """The side ``recipe`` trains and runs at."""
    if recipe.resolution:
        return Resolution(recipe.resolution, None, f"{recipe.resolution} px, set by the recipe")
    if not recipe.trains_backbone:
        return Resolution(backbone_side, None, f"{backbone_side} px, the backbone's: a frozen backbone needs "
                                               "its pretraining scale")
    native = native_side(splits, seed)
    if not native:
        return Resolution(backbone_side, None, f"{backbone_side} px, the backbone's (no image size read)")
    side = max(MIN_SIDE, min(backbone_side, 32 * math.ceil(UPSCALE * native / 32)))
    return Resolution(side, native, f"{side} px: {UPSCALE:g} x the images' {native} px, between {MIN_SIDE} and "
                                    f"the backbone's {backbone_side} (fine-tuning adapts to the scale)")


def with_side(data_config: dict[str, Any], side: int) -> dict[str, Any]:
    """``data_config`` at ``side`` x ``side`` pixels."""
    return {**data_config, "input_size": (3, side, side)}

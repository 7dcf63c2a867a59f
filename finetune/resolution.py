"""The input of the model, from the images' native size: its side for recipes that train the backbone, and
whether evaluation crops the borders.

Every timm backbone has a pretraining resolution (224 px for ``tf_efficientnet_lite0``), and resizing 28-pixel
images up to it costs compute without adding information: a training step at 224 px costs about 12x one at
64 px. A frozen backbone needs its pretraining scale (a probe loses accuracy at lower resolutions), but a
network that is fine-tuned adapts to the new scale (Touvron et al. 2019, "Fixing the train-test resolution
discrepancy"). So recipes that train the backbone run at ``UPSCALE`` x the images' native side (their median
shorter side), rounded up to a multiple of 32 and kept between ``MIN_SIDE`` and the backbone's own; the probe-only
recipes keep the backbone's. ``resolution = N`` in a recipe sets it.

The crop: timm's evaluation transform resizes to ``side / crop_pct`` and cuts the centre ``side`` (``crop_pct``
0.875 for ``tf_efficientnet_lite0``), ImageNet's convention for an object in the middle of a larger photo. It
cuts 12.5% of every border, which on images that are already framed (a garment, a digit, a product shot)
removes part of the object: on the demo folder a probe on whole images scored 1.1 points higher on held-out
test images (docs/benchmarks.md, "Whole images"). ``crop = "auto"`` keeps the whole image (``crop_pct`` 1.0,
squashed to the square input) when the images are smaller than the input, so that they are upscaled anyway:
thumbnails of one object (MNIST, CIFAR, Fashion-MNIST, icons), the kind of data the crop was never meant for;
larger images keep the backbone's crop.

Both are written into the run's data config (``config.json`` ``pretrained_cfg``: ``input_size``, ``crop_pct``,
``crop_mode``), which the export, ``predict`` and ``evaluate`` read: a model trained at 64 px on whole images
is served at 64 px on whole images. Run folders written before keep what their config says.
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
    crop: str = "center"  # "center": the backbone's crop_pct; "whole": nothing cut
    crop_reason: str = "the backbone's centre crop"

    def to_dict(self) -> dict[str, Any]:
        return {"side": self.side, "native": self.native, "reason": self.reason, "crop": self.crop,
                "crop_reason": self.crop_reason}

    def data_config(self, data_config: dict[str, Any]) -> dict[str, Any]:
        """``data_config`` (the backbone's) at this side and crop."""
        config = with_side(data_config, self.side)
        if self.crop == "whole":
            config.update(crop_pct=1.0, crop_mode="squash")
        return config


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
    """The side ``recipe`` trains and runs at, and its crop."""
    native = native_side(splits, seed) if recipe.crop == "auto" or not recipe.resolution else 0
    crop, crop_reason = _crop(recipe.crop, native, backbone_side)
    if recipe.resolution:
        return Resolution(recipe.resolution, native or None, f"{recipe.resolution} px, set by the recipe", crop,
                          crop_reason)
    if not recipe.trains_backbone:
        return Resolution(backbone_side, native or None, f"{backbone_side} px, the backbone's: a frozen backbone "
                                                         "needs its pretraining scale", crop, crop_reason)
    if not native:
        return Resolution(backbone_side, None, f"{backbone_side} px, the backbone's (no image size read)", crop,
                          crop_reason)
    side = max(MIN_SIDE, min(backbone_side, 32 * math.ceil(UPSCALE * native / 32)))
    return Resolution(side, native, f"{side} px: {UPSCALE:g} x the images' {native} px, between {MIN_SIDE} and "
                                    f"the backbone's {backbone_side} (fine-tuning adapts to the scale)", crop,
                      crop_reason)


def _crop(requested: str, native: int, backbone_side: int) -> tuple[str, str]:
    if requested != "auto":
        return requested, f"{requested}, set by the recipe"
    if native and native < backbone_side:
        return "whole", (f"whole images: at {native} px they are smaller than the backbone's {backbone_side} px "
                         "input, so framed thumbnails, not photos to crop the middle of")
    if native:
        return "center", f"the backbone's centre crop: the images ({native} px) are photos at least its input's size"
    return "center", "the backbone's centre crop (no image size read)"


def with_side(data_config: dict[str, Any], side: int) -> dict[str, Any]:
    """``data_config`` at ``side`` x ``side`` pixels."""
    return {**data_config, "input_size": (3, side, side)}

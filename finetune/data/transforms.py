"""Albumentations pipelines sized and normalised from the backbone's timm data config.

The eval pipeline reproduces `timm.data.create_transform(**data_config, is_training=False)`: the same
output size, the same crop offsets and the same (Pillow, antialiased) resampling, so a fine-tuned model is
evaluated, exported and served on exactly the pixels timm would give it. Augmentation for training uses
albumentations' OpenCV kernels, where speed matters more than bit-exactness.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2
from PIL import Image

_CV2_INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
    "box": cv2.INTER_AREA,
}
_PIL_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
CROP_MODES = ("center", "squash", "border")
DEFAULT_CROP_PCT = 0.875  # timm's default when a config has no crop_pct


@dataclass(frozen=True)
class DataConfig:
    """The fields of a timm data config that preprocessing needs, checked once."""

    size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float
    crop_mode: str


def parse_data_config(data_config: Mapping[str, Any]) -> DataConfig:
    """Check a timm data config (from `timm.data.resolve_model_data_config`); ValueError names the key."""
    if not isinstance(data_config, Mapping):
        raise ValueError(
            f"data_config must be a dict from timm.data.resolve_model_data_config, got {data_config!r}"
        )
    missing = [key for key in ("input_size", "mean", "std") if key not in data_config]
    if missing:
        raise ValueError(
            f"data_config is missing {', '.join(missing)}; build it with "
            "timm.data.resolve_model_data_config(model)"
        )
    return DataConfig(
        size=_input_size(data_config["input_size"]),
        mean=_three_floats("mean", data_config["mean"], positive=False),
        std=_three_floats("std", data_config["std"], positive=True),
        interpolation=_interpolation(data_config.get("interpolation", "bilinear")),
        crop_pct=_crop_pct(data_config.get("crop_pct")),
        crop_mode=_crop_mode(data_config.get("crop_mode")),
    )


def _input_size(value: Any) -> tuple[int, int]:
    if not (
        isinstance(value, Sequence) and len(value) == 3 and value[0] == 3 and all(int(v) > 0 for v in value)
    ):
        raise ValueError(f"data_config['input_size'] must be (3, height, width), got {value!r}")
    return int(value[1]), int(value[2])


def _three_floats(key: str, value: Any, *, positive: bool) -> tuple[float, float, float]:
    values = tuple(float(v) for v in value) if isinstance(value, Sequence) else ()
    if len(values) != 3 or (positive and min(values) <= 0):
        need = "3 positive numbers" if positive else "3 numbers"
        raise ValueError(f"data_config['{key}'] must be {need} (one per RGB channel), got {value!r}")
    return values  # type: ignore[return-value]


def _interpolation(value: Any) -> str:
    if value not in _CV2_INTERPOLATION:
        raise ValueError(
            f"data_config['interpolation'] is {value!r}; supported: {', '.join(sorted(_CV2_INTERPOLATION))}"
        )
    return str(value)


def _crop_pct(value: Any) -> float:
    if value is None:
        return DEFAULT_CROP_PCT
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"data_config['crop_pct'] must be a positive number, got {value!r}")
    return float(value)


def _crop_mode(value: Any) -> str:
    if value is None:
        return "center"
    if value not in CROP_MODES:
        raise ValueError(f"data_config['crop_mode'] is {value!r}; supported: {', '.join(CROP_MODES)}")
    return str(value)


def build_transforms(
    data_config: Mapping[str, Any],
    train: bool,
    *,
    scale_min: float = 0.08,
    hflip: float = 0.5,
    color_jitter: float = 0.4,
    seed: int | None = None,
) -> A.Compose:
    """An albumentations pipeline mapping an (H, W, 3) uint8 RGB array to a float32 (3, h, w) tensor.

    `train=True`: random resized crop (area scale in [scale_min, 1]), horizontal flip with probability
    `hflip`, colour jitter of strength `color_jitter` (flip and jitter left out when 0), normalise.
    `train=False`: timm's eval transform for the config (resize, centre crop, normalise); the augmentation
    arguments are still validated but unused. `seed` makes the random augmentations reproducible.
    Call it as `pipeline(image=array)["image"]`.
    """
    _check_augment(scale_min, hflip, color_jitter)
    cfg = parse_data_config(data_config)
    head = _train_steps(cfg, scale_min, hflip, color_jitter) if train else [_eval_step(cfg)]
    tail = [A.Normalize(mean=cfg.mean, std=cfg.std, max_pixel_value=255.0), ToTensorV2()]
    return A.Compose([*head, *tail], seed=seed)


def _check_augment(scale_min: float, hflip: float, color_jitter: float) -> None:
    if not (_is_number(scale_min) and 0 < scale_min <= 1):
        raise ValueError(f"scale_min must be in (0, 1] (smallest crop area as a fraction), got {scale_min!r}")
    if not (_is_number(hflip) and 0 <= hflip <= 1):
        raise ValueError(f"hflip must be a probability in [0, 1], got {hflip!r}")
    if not (_is_number(color_jitter) and color_jitter >= 0):
        raise ValueError(f"color_jitter must be a finite number >= 0 (0 turns it off), got {color_jitter!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _train_steps(cfg: DataConfig, scale_min: float, hflip: float, color_jitter: float) -> list[Any]:
    # area_for_downscale: OpenCV's cubic/linear kernels alias when shrinking; INTER_AREA then gives the
    # antialiased look that the eval (Pillow) resize has, so train and eval images look alike.
    steps: list[Any] = [
        A.RandomResizedCrop(
            size=cfg.size,
            scale=(scale_min, 1.0),
            ratio=(3 / 4, 4 / 3),
            interpolation=_CV2_INTERPOLATION[cfg.interpolation],
            area_for_downscale="image",
        )
    ]
    if hflip > 0:
        steps.append(A.HorizontalFlip(p=hflip))
    if color_jitter > 0:
        # torchvision semantics (timm's train transform): factor in [max(0, 1 - j), 1 + j], applied always.
        factor = (max(0.0, 1.0 - color_jitter), 1.0 + color_jitter)
        steps.append(A.ColorJitter(brightness=factor, contrast=factor, saturation=factor, hue=0.0, p=1.0))
    return steps


def _eval_step(cfg: DataConfig) -> ResizeCenterCrop:
    fill = tuple(round(255 * m) for m in cfg.mean)  # timm pads 'border' mode with the mean colour
    return ResizeCenterCrop(cfg.size[0], cfg.size[1], cfg.crop_pct, cfg.crop_mode, cfg.interpolation, fill)


class ResizeCenterCrop(A.ImageOnlyTransform):
    """timm's eval geometry (`transforms_imagenet_eval`): resize by 1/crop_pct, then centre crop or pad.

    Resampling goes through Pillow like timm's, because OpenCV's kernels do not antialias when shrinking;
    sizes and offsets follow torchvision's integer rounding, because albumentations' SmallestMaxSize and
    CenterCrop round differently and shift the crop by a pixel.
    """

    def __init__(
        self,
        height: int,
        width: int,
        crop_pct: float = DEFAULT_CROP_PCT,
        crop_mode: str = "center",
        interpolation: str = "bilinear",
        fill: tuple[int, int, int] = (0, 0, 0),
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.height, self.width = int(height), int(width)
        self.crop_pct = _crop_pct(crop_pct)
        self.crop_mode = _crop_mode(crop_mode)
        self.interpolation = _interpolation(interpolation)
        self.fill = tuple(int(v) for v in fill)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return resize_center_crop(
            img, (self.height, self.width), self.crop_pct, self.crop_mode, self.interpolation, self.fill
        )

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width", "crop_pct", "crop_mode", "interpolation", "fill")


def resize_center_crop(
    img: np.ndarray,
    size: tuple[int, int],
    crop_pct: float,
    crop_mode: str,
    interpolation: str,
    fill: tuple[int, ...] = (0, 0, 0),
) -> np.ndarray:
    """The geometry of timm's eval transform on an (H, W, 3) uint8 array; returns (size[0], size[1], 3)."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {img.dtype} {img.shape}")
    scale = eval_resize_size(size, crop_pct)
    new_hw = _resized_shape(img.shape[:2], scale, crop_mode)
    resized = _pil_resize(img, new_hw, interpolation)
    pad_fill = fill if crop_mode == "border" else (0, 0, 0)  # torchvision's CenterCrop pads with black
    return _center_crop_or_pad(resized, size, pad_fill)


def eval_resize_size(size: tuple[int, int], crop_pct: float) -> tuple[int, int]:
    """The (h, w) box timm's eval transform resizes into before cropping ``size``: size / crop_pct, floored."""
    return math.floor(size[0] / crop_pct), math.floor(size[1] / crop_pct)


def shrink_short_side(img: np.ndarray, side: int, interpolation: str) -> np.ndarray:
    """Downscale (never upscale) an (H, W, 3) uint8 image so its shorter side is ``side``, with the eval
    transform's rounding and Pillow resampling: on the result, a centre-mode eval transform whose resize box
    is (side, side) resizes nothing, so it gives exactly the pixels it would give from the original."""
    if min(img.shape[:2]) <= side:
        return img
    return _pil_resize(img, _resized_shape(img.shape[:2], (side, side), "center"), _interpolation(interpolation))


def _resized_shape(hw: tuple[int, int], scale: tuple[int, int], crop_mode: str) -> tuple[int, int]:
    """Output (h, w) of timm's resize step for one of its crop modes."""
    if crop_mode == "squash":
        return scale
    h, w = hw
    if crop_mode == "center" and scale[0] == scale[1]:
        # torchvision Resize(int): the short side becomes exactly `scale`, the long side is truncated.
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(scale[0] * long / short)
        return (new_long, scale[0]) if w <= h else (scale[0], new_long)
    # timm ResizeKeepRatio: fit the longest side ('border') or the shortest side ('center'), then round.
    ratios = (h / scale[0], w / scale[1])
    ratio = max(ratios) if crop_mode == "border" else min(ratios)
    return round(h / ratio), round(w / ratio)


def _pil_resize(img: np.ndarray, hw: tuple[int, int], interpolation: str) -> np.ndarray:
    if hw == img.shape[:2]:
        return img
    resized = Image.fromarray(img).resize((hw[1], hw[0]), resample=_PIL_INTERPOLATION[interpolation])
    return np.asarray(resized)


def _center_crop_or_pad(img: np.ndarray, size: tuple[int, int], fill: tuple[int, ...]) -> np.ndarray:
    """torchvision/timm centre crop: pad (left/top gets the smaller half) when too small, then crop at
    round((H - h) / 2) with Python's round, which is what shifts odd margins differently from floor."""
    (h, w), (ch, cw) = img.shape[:2], size
    if ch > h or cw > w:
        top, left = max(ch - h, 0) // 2, max(cw - w, 0) // 2
        bottom, right = max(ch - h, 0) - top, max(cw - w, 0) - left
        img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=fill)
        h, w = img.shape[:2]
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return np.ascontiguousarray(img[top : top + ch, left : left + cw])

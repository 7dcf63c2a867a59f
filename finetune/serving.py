"""The serving side of the export contract: ``model_input`` turns a decoded image into what an export takes,
``ServingModel`` puts a classifier behind that input (normalising inside, returning logits and probabilities)
and ``load_pt2`` loads a torch.export archive back safely. Every export format traces ``ServingModel``;
``predict`` prepares images with ``model_input``."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import runs
from .data.transforms import DataConfig, resize_center_crop


class ServingModel(nn.Module):
    """A classifier behind the export contract: images as a decoder gives them -> (logits, probabilities).

    ``images`` is (N, 3, H, W) at the model's input size, uint8 in [0, 255] or float in [0, 1]. The
    normalisation (the backbone's mean and std) happens here, so every export carries it; probabilities are
    ``softmax(logits / temperature)``.
    """

    def __init__(self, classifier: nn.Module, mean: Sequence[float], std: Sequence[float],
                 temperature: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        self.classifier = classifier
        self.register_buffer("shift", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("scale", 1 / (torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255))
        self.temperature = float(temperature)

    @classmethod
    def from_config(cls, classifier: nn.Module, config: dict[str, Any]) -> ServingModel:
        cfg = config["pretrained_cfg"]
        return cls(classifier, cfg["mean"], cfg["std"], runs.temperature(config)).eval()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The dtype test is resolved when a graph is exported (from a uint8 example), and at run time in eager.
        pixels = images.float() if images.dtype == torch.uint8 else images.float() * 255
        logits = self.classifier((pixels - self.shift) * self.scale).float()
        return logits, (logits / self.temperature).softmax(dim=1)


def model_input(image: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """An (H, W, 3) uint8 RGB image -> the (3, h, w) uint8 array the exports take: timm's eval resize and
    centre crop for the model's data config (``parse_data_config(runs.data_config(config))``)."""
    fill = tuple(round(255 * m) for m in cfg.mean)  # timm pads 'border' crops with the mean colour
    crop = resize_center_crop(image, cfg.size, cfg.crop_pct, cfg.crop_mode, cfg.interpolation, fill)
    return np.ascontiguousarray(crop.transpose(2, 0, 1))


@contextlib.contextmanager
def _weights_only_torch_load() -> Iterator[None]:
    """torch.export.load falls back to full unpickling for some payloads; forbid it while we load."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def load_pt2(path: str | Path) -> nn.Module:
    """The module of a ``model.pt2`` export; every tensor payload is read with ``weights_only=True``."""
    with _weights_only_torch_load(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.export.load(str(path)).module()


class MirrorAverage(nn.Module):
    """``model``'s logits averaged over each image and its mirror image: what a model whose ``config.json`` says
    ``finetune.test_flip`` computes, for a user who loads its weights into plain timm."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.model(x) + self.model(x.flip(-1))) / 2

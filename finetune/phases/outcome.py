"""What a training phase leaves behind: the kept model's scores and how it was chosen."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Outcome:
    training: str  # what ran, in one line
    selection: str  # how the kept model was chosen, in one line (always on validation data)
    val: dict[str, float]  # validation metrics of the kept model
    test: dict[str, float]  # its held-out test metrics ({} without a test split)
    val_logits: torch.Tensor  # for the calibration temperature
    val_labels: torch.Tensor
    # the image file of each row of val_logits (rows of unreadable files are missing); None: not known
    val_files: list[str] | None = None
    epochs_run: int = 0
    best_epoch: int | None = None
    kept: str = "trained"  # "probe" when the probed head beat every fine-tuned epoch (LP-FT)
    timings: dict[str, float] = field(default_factory=dict)
    train_images_per_s: float = math.nan
    skipped: set[str] = field(default_factory=set)  # files that could not be decoded
    # the processes that trained (world, strategy, global batch) and each rank's final weights' sha256: DDP
    # keeps them identical, so the digests must agree
    processes: dict[str, Any] = field(default_factory=dict)
    # the frozen-part cache of the epochs (phases/frozen_cache.py): used or why not, views, bytes, fill time
    frozen_cache: dict[str, Any] | None = None
    # the weights' moving average (recipe ema_decay): which of it and the raw weights was kept, and their scores
    ema: dict[str, Any] | None = None
    # lr=auto: what lr-find's sweep suggested and the rate the epochs used (phases/lr_find.py)
    lr_find: dict[str, Any] | None = None

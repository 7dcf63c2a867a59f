"""The train/val(/test) file lists of a run: from a labels CSV, a saved ``split.json``, or the folder layout."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from .folders import DatasetSplits, scan_image_folder
from .labels import read_labels_csv


def load_splits(data_dir: Path, *, labels: str | Path | None = None, split_file: str | Path | None = None,
                val_fraction: float = 0.2, seed: int = 0) -> DatasetSplits:
    """The train/val(/test) file lists: from a labels CSV, a saved split, or the folder layout."""
    if labels is not None and split_file is not None:
        raise UsageError("--labels and --split both define the split: give one of them")
    if labels is not None:
        return read_labels_csv(labels, data_dir, val_fraction=val_fraction, seed=seed)
    return scan_image_folder(data_dir, val_fraction=val_fraction, seed=seed, split_file=split_file)

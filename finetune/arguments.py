"""Validators for values a user passes (placeholder until the CLI branch lands)."""

from __future__ import annotations

import math

from .errors import UsageError


def check_fit_arguments(*, val_fraction: float, seed: int, num_workers: int | None, epochs: int | None,
                        batch_size: int | None) -> None:
    if not (isinstance(val_fraction, (int, float)) and math.isfinite(val_fraction) and 0 < val_fraction < 1):
        raise UsageError(f"--val-fraction {val_fraction!r}: must be a fraction between 0 and 1, e.g. 0.2")
    if seed < 0:
        raise UsageError(f"--seed {seed}: must be >= 0")
    if num_workers is not None and num_workers < 0:
        raise UsageError(f"--workers {num_workers}: must be >= 0 (0 loads in the main process)")
    for name, value in (("--epochs", epochs), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise UsageError(f"{name} {value}: must be at least 1")

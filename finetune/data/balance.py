"""Class imbalance: measure it, decide whether and how to correct it, and build the class-balanced sampler.

Above `IMBALANCE_RATIO` (largest class / smallest class in train) the plain loss is dominated by the big
classes and accuracy hides a failing small class. The default correction ("sampler") is class-balanced
sampling in Lightning epochs: each training batch draws every class about equally often (small classes are
repeated, big ones subsampled per epoch), the loss and every metric stay unweighted. The probe fits its head
full-batch, where nothing can be resampled, so there any correction is a loss weighted by inverse class
frequency (model/probe.py). Loss weights in epochs too are the alternative (the recipe's `balance`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

BalanceMethod = Literal["none", "sampler", "loss_weights"]

IMBALANCE_RATIO = 3.0
"""Correct the imbalance when the largest training class has more than 3 times the images of the smallest.
Below that the imbalance costs little, and repeating small classes only adds overfitting."""


@dataclass(frozen=True)
class BalancePlan:
    """The decision: `method`, the measured `ratio`, the train `class_counts` and why."""

    method: BalanceMethod
    ratio: float
    class_counts: list[int]
    class_weights: list[float]  # inverse frequency, mean 1 over the classes present; 0 for absent classes
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def imbalance_ratio(class_counts: Sequence[int]) -> float:
    """Largest / smallest count over the classes that have images (1.0 when fewer than two do)."""
    present = [n for n in class_counts if n > 0]
    return max(present) / min(present) if len(present) >= 2 else 1.0


def class_weights(class_counts: Sequence[int]) -> list[float]:
    """Inverse class frequency, scaled to mean 1 over the classes that have images."""
    present = [n for n in class_counts if n > 0]
    if not present:
        return [0.0] * len(class_counts)
    inverse = [1.0 / n if n > 0 else 0.0 for n in class_counts]
    scale = len(present) / sum(inverse)
    return [w * scale for w in inverse]


def plan_balance(
    class_counts: Sequence[int],
    *,
    threshold: float = IMBALANCE_RATIO,
    method: Literal["auto", "none", "sampler", "loss_weights"] = "auto",
) -> BalancePlan:
    """Decide how to correct imbalance. `method="auto"` picks "sampler" above `threshold`, else "none";
    any other `method` is used as given (the reason says so)."""
    if method not in ("auto", "none", "sampler", "loss_weights"):
        raise ValueError(f"balance method must be auto, none, sampler or loss_weights, got {method!r}")
    if not threshold >= 1:
        raise ValueError(f"imbalance threshold must be a ratio >= 1, got {threshold!r}")
    counts = [int(n) for n in class_counts]
    ratio = imbalance_ratio(counts)
    if method != "auto":
        chosen: BalanceMethod = method
        reason = f"{method} chosen by the user (imbalance ratio {ratio:.1f})"
    elif ratio > threshold:
        chosen = "sampler"
        reason = (f"imbalance ratio {ratio:.1f} > {threshold:g}: every class counts about equally (class-balanced "
                  "sampling in epochs, a class-weighted loss in the probe)")
    else:
        chosen = "none"
        reason = f"imbalance ratio {ratio:.1f} <= {threshold:g}: no correction needed"
    return BalancePlan(chosen, ratio, counts, class_weights(counts), reason)


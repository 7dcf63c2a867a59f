"""The pre-flight for `fit`: the doctor's scan on the exact files `fit` is about to train on, before any
compute is spent. It leaves out the files that cannot be used, names them, and stops the run when too many
cannot or a class is left without training images.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from ..errors import DatasetError
from .balance import BalancePlan, plan_balance
from .diagnosis import diagnose_splits
from .findings import DoctorReport, Finding
from .folders import DatasetSplits
from .paths import QUARANTINE_DIR, display_path, relative

logger = logging.getLogger("finetune.data")

MAX_UNUSABLE_FRACTION = 0.1
"""`preflight` stops the run when more than this share of the files cannot be used."""


@dataclass(frozen=True)
class PreflightReport:
    """What `fit` trains on after the pre-flight: `splits` without the `excluded` files (absolute path ->
    "kind: message"), the doctor's `report` and the class `balance` decision for the remaining train set."""

    splits: DatasetSplits
    excluded: dict[str, str]
    report: DoctorReport
    balance: BalancePlan

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.report.findings if f.severity == "warning"]

    def to_dict(self) -> dict[str, Any]:
        """For summary.json: what was left out and why, warnings by kind, the balance decision, timing."""
        return {
            "files": self.report.files,
            "excluded": dict(sorted(self.excluded.items())),
            "warnings": dict(Counter(f.kind for f in self.warnings)),
            "info": dict(Counter(f.kind for f in self.report.findings if f.severity == "info")),
            "imbalance_ratio": self.balance.ratio,
            "balance": self.balance.to_dict(),
            "seconds": round(self.report.seconds, 3),
            "cache_hits": self.report.cache_hits,
        }


def preflight(
    splits: DatasetSplits,
    *,
    max_unusable_fraction: float = MAX_UNUSABLE_FRACTION,
    balance: Literal["auto", "none", "sampler", "loss_weights"] = "auto",
    workers: int | None = None,
    cache: bool = True,
    progress: bool = False,
) -> PreflightReport:
    """Check every file `fit` is about to use (cached), before any compute is spent.

    Files with a blocking finding (unreadable, refused, conflicting labels) are left out of the returned
    splits and named in `excluded`. Raises `DatasetError`, with the doctor's findings, when more than
    `max_unusable_fraction` of the files cannot be used or a class is left without training images.
    """
    if not 0 <= max_unusable_fraction <= 1:
        raise ValueError(f"max_unusable_fraction must be between 0 and 1, got {max_unusable_fraction!r}")
    report = diagnose_splits(splits, workers=workers, cache=cache, progress=progress)
    rels = {relative(s.path, splits.root) for name in ("train", "val", "test") for s in getattr(splits, name)}
    bad = {f.path: f for f in reversed(report.blocking) if f.path in rels}  # the first finding per file
    total = len(rels)
    if total and len(bad) / total > max_unusable_fraction:
        raise DatasetError(
            f"{len(bad)} of {total} files ({len(bad) / total:.0%}) cannot be used, more than the "
            f"{max_unusable_fraction:.0%} allowed:\n{_listing(bad.values())}\n{_doctor_hint(splits.root)}"
        )
    kept = {name: [s for s in getattr(splits, name) if relative(s.path, splits.root) not in bad]
            for name in ("train", "val", "test")}
    clean = replace(splits, train=kept["train"], val=kept["val"], test=kept["test"])
    _check_every_class_trains(clean, bad)
    excluded = {str(splits.root / PurePosixPath(rel)): f"{f.kind}: {f.message}" for rel, f in bad.items()}
    if excluded:
        logger.warning("leaving out %d file(s) that cannot be used:\n%s", len(excluded), _listing(bad.values()))
    return PreflightReport(clean, excluded, report, plan_balance(clean.class_counts("train"), method=balance))


def _check_every_class_trains(splits: DatasetSplits, bad: dict[str, Finding]) -> None:
    empty = [name for name, n in zip(splits.classes, splits.class_counts("train"), strict=True) if n == 0]
    if empty:
        raise DatasetError(
            f"classes {', '.join(empty)} have no usable training images left after leaving out the files "
            f"that cannot be used:\n{_listing(bad.values())}\n{_doctor_hint(splits.root)}"
        )


def _listing(findings: Sequence[Finding] | Any, limit: int = 10) -> str:
    items = list(findings)
    lines = [f"  {display_path(f.path)}: {f.kind}: {f.message}" for f in items[:limit]]
    if len(items) > limit:
        lines.append(f"  ... and {len(items) - limit} more")
    return "\n".join(lines)


def _doctor_hint(root: Path) -> str:
    return (f"run `finetune doctor {root}` for the full report, and add --quarantine to move the blocking "
            f"files into {root / QUARANTINE_DIR}")



"""The doctor's scan: `diagnose(root)` for an image folder in any layout `fit` accepts, `diagnose_splits`
for the exact file lists of a split (what `preflight` and `--labels` check).

Both end the same way: refuse what must not be opened, check every other file (`filecheck`, cached and in
parallel), then compare files across classes and splits (`labelcheck`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from ..errors import DatasetError
from .filecheck import CheckCache, FileCheck, check_files
from .findings import KINDS, DoctorReport, Finding, finding, sorted_findings
from .folders import DatasetSplits, scan_image_folder
from .images import MAX_PIXELS
from .labelcheck import class_counts, class_findings, label_findings
from .layoutcheck import Entry, walk_dataset
from .paths import display_path, is_utf8, outside, relative


def diagnose(
    root: str | os.PathLike[str],
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    workers: int | None = None,
    cache: bool = True,
    progress: bool = False,
    max_pixels: int = MAX_PIXELS,
) -> DoctorReport:
    """Scan an image folder in any layout `fit` accepts.

    `val_fraction` and `seed` reproduce the validation split `fit` would generate, for the leakage check.
    `workers` processes decode the files (default: one per CPU, 0: this process); results are cached by
    path, size and modification time unless `cache=False`. `progress` shows a progress bar on stderr.
    """
    started = time.perf_counter()
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder; pass the image folder that `finetune fit` would get")
    entries, findings, class_dirs = walk_dataset(root)
    entries, scan_error = _assign_scan_splits(root, entries, val_fraction, seed)
    report = _finish(root, entries, findings, class_dirs, started, workers, cache, progress, max_pixels)
    if scan_error and not any(f.kind in ("layout", "empty_class") for f in report.findings):
        report.findings.insert(0, finding(".", "layout", scan_error))  # what `fit` would stop on
    return report


def diagnose_splits(
    splits: DatasetSplits,
    *,
    workers: int | None = None,
    cache: bool = True,
    progress: bool = False,
    max_pixels: int = MAX_PIXELS,
) -> DoctorReport:
    """The per-file and label checks on the exact files of `splits` (e.g. from `labels.read_labels_csv`)."""
    started = time.perf_counter()
    root = splits.root
    entries = [
        Entry(s.path, relative(s.path, root), split, splits.classes[s.label])
        for split in ("train", "val", "test")
        for s in getattr(splits, split)
    ]
    class_dirs = {("train", name): name for name in splits.classes}
    return _finish(root, entries, [], class_dirs, started, workers, cache, progress, max_pixels)


def _finish(
    root: Path,
    entries: list[Entry],
    findings: list[Finding],
    class_dirs: dict[tuple[str, str], str],
    started: float,
    workers: int | None,
    cache: bool,
    progress: bool,
    max_pixels: int,
) -> DoctorReport:
    findings = list(findings)
    refused = _refusals(root, entries)
    findings += [f for fs in refused.values() for f in fs]
    store = CheckCache.for_root(root, cache, max_pixels)
    to_check = [e.path for e in entries if e.rel not in refused]
    with _progress_bar(len(to_check), progress, f"checking {root}") as advance:
        checks = check_files(to_check, store, workers=workers, max_pixels=max_pixels, on_progress=advance)
    usable: list[tuple[Entry, FileCheck]] = []
    for entry in entries:
        check = checks.get(entry.path)
        if check is None:
            continue
        findings += [finding(entry.rel, kind, message) for kind, message in check.issues]
        if check.readable and not any(KINDS[kind].severity == "blocking" for kind, _ in check.issues):
            usable.append((entry, check))
    findings += label_findings(usable)
    blocked = {f.path for f in findings if f.severity == "blocking"}
    good = [e for e, _ in usable if e.rel not in blocked]
    counts = class_counts(good, class_dirs)
    findings += class_findings(entries, good, class_dirs, counts)
    seconds = time.perf_counter() - started
    return DoctorReport(root, sorted_findings(findings), counts, len(entries), seconds, store.hits)


def _assign_scan_splits(
    root: Path, entries: list[Entry], val_fraction: float, seed: int
) -> tuple[list[Entry], str | None]:
    """Give entries the split `fit` would use (the generated val split included), or return why `fit`'s
    folder scan fails."""
    scan_logger = logging.getLogger("finetune.data")
    level = scan_logger.level
    scan_logger.setLevel(logging.ERROR)  # its warnings (loose files, ...) are findings here
    try:
        splits = scan_image_folder(root, val_fraction=val_fraction, seed=seed)
    except DatasetError as exc:
        return entries, str(exc)
    finally:
        scan_logger.setLevel(level)
    where = {s.path: split for split in ("train", "val", "test") for s in getattr(splits, split)}
    return [replace(e, split=where.get(e.path, e.split)) for e in entries], None


def _refusals(root: Path, entries: list[Entry]) -> dict[str, list[Finding]]:
    """Files that are not opened at all: names that are not UTF-8, links that leave the dataset."""
    refused: dict[str, list[Finding]] = {}
    real_root = os.path.realpath(root)
    for e in entries:
        if not is_utf8(e.rel):
            refused[e.rel] = [finding(e.rel, "non_utf8_path", f"the path is not valid UTF-8 ({display_path(e.rel)})")]
        elif outside(e.path, root, real_root):
            target = display_path(os.path.realpath(e.path))
            refused[e.rel] = [finding(e.rel, "symlink_outside_root", f"a link to {target}, outside the dataset")]
    return refused


@contextmanager
def _progress_bar(total: int, enabled: bool, description: str) -> Iterator[Callable[[int], None] | None]:
    if not enabled or total == 0:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)

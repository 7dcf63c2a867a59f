"""The dataset doctor: find, explain and quarantine the files that would spoil a training run.

`diagnose(root)` scans any layout `fit` accepts and returns a `DoctorReport`: one `Finding` per problem, each
with the file or class folder it is about, a kind from `KINDS`, a severity and the fix. `quarantine(report)`
moves the blocking files into ``root/_quarantine/<kind>/`` with a manifest (nothing is deleted).
`preflight(splits)` is the same scan on the exact file lists `fit` is about to train on: it leaves out the
files that cannot be used, names them, and stops the run when too many cannot.

Severities: "blocking" files cannot be trained on (unreadable, dangerous, contradictory labels) or the
folder cannot be loaded as laid out; "warning" will train but likely hurts or misleads; "info" is converted
on the fly and worth knowing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np

from ..errors import DatasetError
from .balance import IMBALANCE_RATIO, BalancePlan, imbalance_ratio, plan_balance
from .filecheck import MAX_ASPECT_RATIO, MIN_SIDE, CheckCache, FileCheck, check_files
from .folders import DatasetSplits, _find_layout, scan_image_folder
from .images import IMAGE_EXTENSIONS, MAX_PIXELS
from .paths import QUARANTINE_DIR

logger = logging.getLogger("finetune.data")

Severity = Literal["info", "warning", "blocking"]
SEVERITIES: tuple[Severity, ...] = ("blocking", "warning", "info")

MIN_IMAGES_PER_CLASS = 5
"""Classes with fewer usable images than this are reported (`few_images`): too few to learn or to measure."""
NEAR_DUPLICATE_BITS = 4
"""Perceptual hashes (64 bits) this close count as the same picture (re-encoded, resized, lightly edited)."""
MAX_UNUSABLE_FRACTION = 0.1
"""`preflight` stops the run when more than this share of the files cannot be used."""
MANIFEST = "manifest.json"
DEBRIS_NAMES = frozenset(
    name.lower()
    for name in (".DS_Store", "Thumbs.db", "ehthumbs.db", "desktop.ini", "__MACOSX", ".Spotlight-V100",
                 ".Trashes", ".fseventsd", ".AppleDouble", "@eaDir", "$RECYCLE.BIN", "System Volume Information",
                 ".ipynb_checkpoints", ".directory")
)
"""Files and folders that operating systems and tools leave behind (plus AppleDouble `._name` files)."""
_UNSUPPORTED_EXTENSIONS = frozenset({".heic", ".heif", ".avif", ".jxl", ".svg", ".psd", ".raw", ".cr2", ".cr3",
                                     ".nef", ".arw", ".dng", ".raf", ".orf", ".jp2", ".ico", ".pdf"})


@dataclass(frozen=True)
class FindingKind:
    """One kind of problem: its name, severity, group and the usual fix."""

    name: str
    severity: Severity
    group: str
    fix: str


KINDS: dict[str, FindingKind] = {
    k.name: k
    for k in (
        # unreadable: training would skip them
        FindingKind("empty_file", "blocking", "unreadable", "the file has 0 bytes: copy or download it again"),
        FindingKind("truncated", "blocking", "unreadable", "the data ends early: copy or download it again"),
        FindingKind("corrupt", "blocking", "unreadable", "re-export the image from its source, or remove it"),
        FindingKind("not_an_image", "blocking", "unreadable",
                    "the content is not an image despite its extension: remove it or fix its name"),
        FindingKind("unsupported_format", "blocking", "unreadable", "convert it to JPEG or PNG"),
        FindingKind("permission_denied", "blocking", "unreadable", "make it readable (chmod a+r FILE)"),
        FindingKind("unreadable", "blocking", "unreadable", "check that the file exists and can be read"),
        # convertible: load_rgb handles them
        FindingKind("grayscale", "info", "convertible", "none needed: the channel is repeated to RGB"),
        FindingKind("palette", "info", "convertible", "none needed: converted to RGB (transparency on white)"),
        FindingKind("rgba", "info", "convertible",
                    "none needed: composited on white; flatten it yourself for another background"),
        FindingKind("cmyk", "info", "convertible", "none needed: converted to RGB"),
        FindingKind("16_bit", "info", "convertible", "none needed: scaled to 8 bit"),
        FindingKind("exif_rotated", "info", "convertible", "none needed: the EXIF orientation is applied"),
        FindingKind("animated", "info", "convertible", "only the first frame is used; extract frames to use more"),
        FindingKind("too_small", "warning", "convertible",
                    f"under {MIN_SIDE} px on a side it is mostly upscaling blur: use a larger copy or remove it"),
        FindingKind("extreme_aspect", "warning", "convertible",
                    f"above {MAX_ASPECT_RATIO:g}:1 the centre crop keeps little of it: crop it yourself or remove it"),
        # dangerous: refused
        FindingKind("decompression_bomb", "blocking", "dangerous",
                    f"refused without decoding: downscale it below {MAX_PIXELS:,} pixels"),
        FindingKind("symlink_outside_root", "blocking", "dangerous",
                    "refused: copy the file into the dataset instead of linking outside it"),
        FindingKind("non_utf8_path", "blocking", "dangerous",
                    "rename it to a valid UTF-8 name (the run folder's split.json must record it)"),
        # structural
        FindingKind("layout", "blocking", "structural", "fix the folder layout as the message says"),
        FindingKind("empty_class", "blocking", "structural", "add images to the class folder or remove it"),
        FindingKind("few_images", "warning", "structural",
                    f"add images: under {MIN_IMAGES_PER_CLASS} per class can be neither learnt nor measured"),
        FindingKind("hidden_file", "info", "structural", "ignored by fit; delete it if it should not be there"),
        FindingKind("os_debris", "info", "structural", "ignored by fit; safe to delete"),
        FindingKind("nested_folder", "warning", "structural",
                    "its images are labelled with the class above it: move them up, or into their own class"),
        FindingKind("wrong_depth", "warning", "structural", "ignored by fit: move it into a class folder"),
        FindingKind("ignored_file", "info", "structural", "ignored by fit (not an image extension it reads)"),
        # labels
        FindingKind("conflicting_labels", "blocking", "labels",
                    "the same bytes are in several classes: keep the copy in the right class, delete the others"),
        FindingKind("leakage", "warning", "labels",
                    "the same picture is in train and in val/test, which inflates the scores: keep one copy"),
        FindingKind("duplicate", "info", "labels", "delete all but one copy (it weighs double in training)"),
        # balance
        FindingKind("class_imbalance", "warning", "balance",
                    f"fit balances classes above a ratio of {IMBALANCE_RATIO:g} (class-balanced sampling); "
                    "collect more images for the small classes if you can"),
    )
}
"""Every kind of finding, by name. The README's "Dataset doctor" section lists them."""


@dataclass(frozen=True)
class Finding:
    """One problem: `path` is POSIX and relative to the dataset root ("." for the whole dataset)."""

    path: str
    kind: str
    severity: Severity
    message: str
    fix: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def finding(path: str, kind: str, message: str) -> Finding:
    spec = KINDS[kind]
    return Finding(path, kind, spec.severity, message, spec.fix)


@dataclass
class DoctorReport:
    """The result of a scan. `ok` (exit status 0) when nothing blocks training."""

    root: Path
    findings: list[Finding]
    class_counts: dict[str, dict[str, int]]  # split -> class -> usable images
    files: int  # image files checked
    seconds: float = 0.0
    cache_hits: int = 0
    quarantined: list[dict[str, str]] = field(default_factory=list)  # moves made by `quarantine`

    @property
    def blocking(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "blocking"]

    @property
    def unresolved(self) -> list[Finding]:
        """Blocking findings still in place (not moved into quarantine)."""
        moved = {move["from"] for move in self.quarantined}
        return [f for f in self.blocking if f.path not in moved]

    @property
    def ok(self) -> bool:
        return not self.unresolved

    @property
    def imbalance_ratio(self) -> float:
        return imbalance_ratio(list(self.class_counts.get("train", {}).values()))

    def counts(self) -> dict[str, int]:
        """Findings per severity."""
        found = Counter(f.severity for f in self.findings)
        return {severity: found.get(severity, 0) for severity in SEVERITIES}

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "ok": self.ok,
            "files": self.files,
            "counts": self.counts(),
            "classes": self.class_counts,
            "imbalance_ratio": self.imbalance_ratio,
            "seconds": round(self.seconds, 3),
            "cache_hits": self.cache_hits,
            "findings": [f.to_dict() for f in self.findings],
            "quarantined": self.quarantined,
        }


@dataclass(frozen=True)
class _Entry:
    """An image file to check: where it is, and the split and class `fit` would give it."""

    path: Path
    rel: str
    split: str
    label: str


# --- scanning a folder --------------------------------------------------------------------------------------


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
    entries, findings, class_dirs = _walk(root)
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
        _Entry(s.path, _relative(s.path, root), split, splits.classes[s.label])
        for split in ("train", "val", "test")
        for s in getattr(splits, split)
    ]
    class_dirs = {("train", name): name for name in splits.classes}
    return _finish(root, entries, [], class_dirs, started, workers, cache, progress, max_pixels)


def _finish(
    root: Path,
    entries: list[_Entry],
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
    usable: list[tuple[_Entry, FileCheck]] = []
    for entry in entries:
        check = checks.get(entry.path)
        if check is None:
            continue
        findings += [finding(entry.rel, kind, message) for kind, message in check.issues]
        if check.readable and not any(KINDS[kind].severity == "blocking" for kind, _ in check.issues):
            usable.append((entry, check))
    findings += _label_findings(usable)
    blocked = {f.path for f in findings if f.severity == "blocking"}
    good = [e for e, _ in usable if e.rel not in blocked]
    counts = _class_counts(good, class_dirs)
    findings += _class_findings(entries, good, class_dirs, counts)
    return DoctorReport(root, _sorted(findings), counts, len(entries), time.perf_counter() - started, store.hits)


def _walk(root: Path) -> tuple[list[_Entry], list[Finding], dict[tuple[str, str], str]]:
    """Every image file with its split and class, and the structural findings on the way."""
    try:
        layout = _find_layout(root)
    except DatasetError as exc:
        return [], [finding(".", "layout", str(exc))], {}
    entries: list[_Entry] = []
    findings: list[Finding] = []
    class_dirs: dict[tuple[str, str], str] = {}
    split_dirs = {"train": layout.train, "val": layout.val, "test": layout.test}
    if layout.train != root:
        _loose_entries(root, root, set(split_dirs.values()), findings, "a split folder (train/, val/, test/)")
    for split, split_dir in split_dirs.items():
        if split_dir is None:
            continue
        class_folders = _loose_entries(root, split_dir, set(), findings, "a class folder")
        for class_dir in class_folders:
            rel = _relative(class_dir, root)
            if _outside(class_dir, root):
                findings.append(finding(rel, "symlink_outside_root", "a class folder linked from outside the dataset"))
                continue
            class_dirs[(split, class_dir.name)] = rel
            entries += _class_entries(root, class_dir, split, findings)
    return entries, findings, class_dirs


def _loose_entries(root: Path, folder: Path, skip: set[Path | None], findings: list[Finding], where: str) -> list[Path]:
    """Report what lies directly in `folder` besides sub-folders; return the sub-folders (class folders)."""
    subdirs = []
    for path in _listdir(folder, root, findings):
        if path in skip or (folder == root and path.name == QUARANTINE_DIR):
            continue
        if _hidden_or_debris(path, root, findings) or _non_utf8(path, root, findings):
            continue
        if path.is_dir():
            subdirs.append(path)
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            findings.append(finding(_relative(path, root), "wrong_depth", f"an image outside {where}"))
        else:
            findings.append(finding(_relative(path, root), "ignored_file", _ignored_message(path)))
    return subdirs


def _class_entries(root: Path, class_dir: Path, split: str, findings: list[Finding]) -> list[_Entry]:
    """Image files anywhere below one class folder, as `folders.scan_image_folder` finds them."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        folder = Path(dirpath)
        keep = []
        for name in sorted(dirnames):
            sub = folder / name
            if not (_hidden_or_debris(sub, root, findings) or _non_utf8(sub, root, findings)):
                keep.append(name)
        dirnames[:] = keep
        if folder != class_dir and folder.parent == class_dir:
            findings.append(finding(_relative(folder, root), "nested_folder",
                                    f"a folder inside class {class_dir.name!r}"))
        for name in sorted(filenames):
            path = folder / name
            if _hidden_or_debris(path, root, findings):
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                findings.append(finding(_relative(path, root), "ignored_file", _ignored_message(path)))
                continue
            entries.append(_Entry(path, _relative(path, root), split, class_dir.name))
    return entries


def _listdir(folder: Path, root: Path, findings: list[Finding]) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError as exc:
        findings.append(finding(_relative(folder, root), "layout", f"cannot list the folder ({exc.strerror or exc})"))
        return []


def _hidden_or_debris(path: Path, root: Path, findings: list[Finding]) -> bool:
    name = path.name
    if name.lower() in DEBRIS_NAMES or name.startswith("._"):
        what = "folder" if path.is_dir() else "file"
        findings.append(finding(_relative(path, root), "os_debris", f"a {what} left by the operating system"))
        return True
    if name.startswith("."):
        findings.append(finding(_relative(path, root), "hidden_file", "hidden (its name starts with '.')"))
        return True
    return False


def _non_utf8(path: Path, root: Path, findings: list[Finding]) -> bool:
    if _is_utf8(path.name):
        return False
    findings.append(finding(_relative(path, root), "non_utf8_path",
                            f"the name is not valid UTF-8 ({display_path(path.name)})"))
    return True


def _ignored_message(path: Path) -> str:
    if path.suffix.lower() in _UNSUPPORTED_EXTENSIONS:
        return f"{path.suffix} images are not read: convert to JPEG or PNG to use it"
    return f"not an image extension fit reads ({path.suffix or 'no extension'})"


def _assign_scan_splits(
    root: Path, entries: list[_Entry], val_fraction: float, seed: int
) -> tuple[list[_Entry], str | None]:
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


def _refusals(root: Path, entries: list[_Entry]) -> dict[str, list[Finding]]:
    """Files that are not opened at all: names that are not UTF-8, links that leave the dataset."""
    refused: dict[str, list[Finding]] = {}
    real_root = os.path.realpath(root)
    for e in entries:
        if not _is_utf8(e.rel):
            refused[e.rel] = [finding(e.rel, "non_utf8_path", f"the path is not valid UTF-8 ({display_path(e.rel)})")]
        elif _outside(e.path, root, real_root):
            target = display_path(os.path.realpath(e.path))
            refused[e.rel] = [finding(e.rel, "symlink_outside_root", f"a link to {target}, outside the dataset")]
    return refused


# --- findings about classes and labels --------------------------------------------------------------------


def _label_findings(usable: list[tuple[_Entry, FileCheck]]) -> list[Finding]:
    """Exact copies across classes (conflict), across splits (leakage) or within a class (duplicate), and
    near-identical pictures in train and in val/test (leakage)."""
    findings = []
    groups: dict[str, list[_Entry]] = defaultdict(list)
    for entry, check in usable:
        if check.digest:
            groups[check.digest].append(entry)
    for copies in groups.values():
        if len(copies) > 1:
            findings += _copy_findings(sorted(copies, key=_split_order))
    exact = {e.rel for copies in groups.values() if len(copies) > 1 for e in copies}
    findings += _near_leakage([(e, c) for e, c in usable if e.rel not in exact and c.phash is not None])
    return findings


def _copy_findings(copies: list[_Entry]) -> list[Finding]:
    labels = sorted({e.label for e in copies})
    if len(labels) > 1:
        where = ", ".join(f"{e.rel} ({e.label})" for e in copies)
        return [finding(e.rel, "conflicting_labels", f"byte-identical files in classes {', '.join(labels)}: {where}")
                for e in copies]
    first, findings = copies[0], []
    for e in copies[1:]:
        if e.split != first.split:
            findings.append(finding(e.rel, "leakage", f"identical to {first.split} file {first.rel}"))
        else:
            findings.append(finding(e.rel, "duplicate", f"identical to {first.rel} in the same class"))
    return findings


def _near_leakage(hashed: list[tuple[_Entry, FileCheck]]) -> list[Finding]:
    train = [(e, c) for e, c in hashed if e.split == "train"]
    held_out = [(e, c) for e, c in hashed if e.split != "train"]
    if not train or not held_out:
        return []
    train_hashes = np.array([c.phash for _, c in train], dtype=np.uint64)
    findings = []
    for start in range(0, len(held_out), 512):
        chunk = held_out[start : start + 512]
        hashes = np.array([c.phash for _, c in chunk], dtype=np.uint64)
        distance = _popcount(hashes[:, None] ^ train_hashes[None, :])
        nearest = distance.argmin(axis=1)
        for (entry, _), j, row in zip(chunk, nearest, distance, strict=True):
            if row[j] <= NEAR_DUPLICATE_BITS:
                twin = train[j][0]
                findings.append(finding(entry.rel, "leakage", f"near-identical to train file {twin.rel} "
                                        f"(perceptual hash distance {int(row[j])} of 64)"))
    return findings


def _popcount(values: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(values)
    as_bytes = values.view(np.uint8).reshape(*values.shape, 8)
    return np.unpackbits(as_bytes, axis=-1).sum(axis=-1)


def _class_counts(good: list[_Entry], class_dirs: dict[tuple[str, str], str]) -> dict[str, dict[str, int]]:
    found = Counter((e.split, e.label) for e in good)
    keys = sorted(set(class_dirs) | set(found))
    return {split: {label: found.get((split, label), 0) for s, label in keys if s == split}
            for split in ("train", "val", "test") if any(s == split for s, _ in keys)}


def _class_findings(
    entries: list[_Entry], good: list[_Entry], class_dirs: dict[tuple[str, str], str], counts: dict[str, dict[str, int]]
) -> list[Finding]:
    findings = []
    files = Counter((e.split, e.label) for e in entries)
    for (split, label), rel in sorted(class_dirs.items()):
        n_files, n_good = files.get((split, label), 0), counts.get(split, {}).get(label, 0)
        if n_files == 0:
            findings.append(finding(rel, "empty_class", f"class {label!r} has no image files in {split}"))
        elif n_good == 0 and split == "train":
            findings.append(finding(rel, "empty_class", f"none of the {n_files} image files of class {label!r} "
                                                        "can be used"))
    totals = Counter(e.label for e in good)
    for label in sorted(counts.get("train", {})):
        if 0 < totals[label] < MIN_IMAGES_PER_CLASS:
            rel = class_dirs.get(("train", label), label)
            findings.append(finding(rel, "few_images", f"class {label!r} has {totals[label]} usable images"))
    train = counts.get("train", {})
    ratio = imbalance_ratio(list(train.values()))
    if ratio > IMBALANCE_RATIO:
        present = {k: v for k, v in train.items() if v}
        big, small = max(present, key=present.get), min(present, key=present.get)
        findings.append(finding(".", "class_imbalance", f"imbalance ratio {ratio:.1f}: {big!r} has {present[big]} "
                                                        f"training images, {small!r} has {present[small]}"))
    return findings


# --- quarantine -------------------------------------------------------------------------------------------


def quarantine(report: DoctorReport) -> list[dict[str, str]]:
    """Move every blocking file or folder into ``root/_quarantine/<kind>/<its relative path>`` and append
    each move to ``root/_quarantine/manifest.json``. Nothing is deleted, nothing outside the root is
    touched (a link is moved, never its target). Returns the moves (also kept in `report.quarantined`)."""
    root = report.root
    moves = []
    # files before folders, so that an emptied class folder moves after its files
    targets = sorted({(f.path, f.kind): f for f in report.blocking if f.path not in ("", ".")}.values(),
                     key=lambda f: (os.path.isdir(root / f.path) and not os.path.islink(root / f.path), f.path))
    moved: set[str] = set()
    for f in targets:
        source = root / f.path
        if f.path in moved or not os.path.lexists(source) or _outside(source.parent, root):
            continue
        destination = _free_path(root / QUARANTINE_DIR / f.kind / f.path)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(os.fspath(source), os.fspath(destination))
        moved.add(f.path)
        moves.append({"from": f.path, "to": _relative(destination, root), "kind": f.kind, "message": f.message,
                      "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    if moves:
        _append_manifest(root / QUARANTINE_DIR / MANIFEST, moves)
    report.quarantined = moves
    return moves


def _free_path(path: Path) -> Path:
    candidate, n = path, 1
    while os.path.lexists(candidate):
        candidate = path.with_name(f"{path.stem}.{n}{path.suffix}")
        n += 1
    return candidate


def _append_manifest(path: Path, moves: list[dict[str, str]]) -> None:
    data: dict[str, Any] = {"format": "finetune.quarantine", "version": 1, "moves": []}
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            path.rename(_free_path(path.with_name("manifest.damaged.json")))  # keep it, start a new one
    data.setdefault("moves", []).extend(moves)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")  # ensure_ascii: any file name fits
    os.replace(tmp, path)


# --- pre-flight for fit -----------------------------------------------------------------------------------


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
    rels = {_relative(s.path, splits.root) for name in ("train", "val", "test") for s in getattr(splits, name)}
    bad = {f.path: f for f in reversed(report.blocking) if f.path in rels}  # the first finding per file
    total = len(rels)
    if total and len(bad) / total > max_unusable_fraction:
        raise DatasetError(
            f"{len(bad)} of {total} files ({len(bad) / total:.0%}) cannot be used, more than the "
            f"{max_unusable_fraction:.0%} allowed:\n{_listing(bad.values())}\n{_doctor_hint(splits.root)}"
        )
    kept = {name: [s for s in getattr(splits, name) if _relative(s.path, splits.root) not in bad]
            for name in ("train", "val", "test")}
    clean = DatasetSplits(splits.root, splits.classes, kept["train"], kept["val"], kept["test"], splits.split_source)
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


# --- small helpers ----------------------------------------------------------------------------------------


def _relative(path: Path, root: Path) -> str:
    try:
        return PurePosixPath(Path(path).relative_to(root)).as_posix()
    except ValueError:
        return Path(path).as_posix()


def _outside(path: Path, root: Path, real_root: str | None = None) -> bool:
    """True when `path`, links followed, is not inside `root` (links followed)."""
    real_root = real_root or os.path.realpath(root)
    real = os.path.realpath(path)
    return os.path.commonpath([real, real_root]) != real_root


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # os.fsdecode keeps undecodable bytes as lone surrogates
        return False
    return True


def display_path(text: str | os.PathLike[str]) -> str:
    """A printable form of any path: undecodable bytes shown as \\xNN."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def _split_order(entry: _Entry) -> tuple[int, str]:
    return ({"train": 0, "val": 1, "test": 2}.get(entry.split, 3), entry.rel)


def _sorted(findings: list[Finding]) -> list[Finding]:
    rank = {severity: i for i, severity in enumerate(SEVERITIES)}
    return sorted(findings, key=lambda f: (rank[f.severity], f.kind, f.path))


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


__all__ = [
    "KINDS",
    "MAX_UNUSABLE_FRACTION",
    "MIN_IMAGES_PER_CLASS",
    "NEAR_DUPLICATE_BITS",
    "DoctorReport",
    "Finding",
    "FindingKind",
    "PreflightReport",
    "diagnose",
    "diagnose_splits",
    "display_path",
    "preflight",
    "quarantine",
]

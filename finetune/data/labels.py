"""A labels file as an alternative to the folder layout: ``path,label`` rows, with an optional ``split`` column.

    path,label,split
    photos/0001.jpg,cat,train
    photos/0002.jpg,dog,val

Paths are relative to the dataset root (absolute paths and paths that leave the root are rejected). The
header row is optional. Without a split column (or with no val rows) a stratified, seeded val split is
made exactly as for folders. Every error names the file, the line number and the fix.
"""

from __future__ import annotations

import csv
import os
import posixpath
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import DatasetError
from .folders import TEST_DIR_NAMES, VAL_DIR_NAMES, DatasetSplits, Sample, _stratified_split

SPLIT_NAMES = {"train": "train", **{name: "val" for name in VAL_DIR_NAMES}, **{name: "test" for name in TEST_DIR_NAMES}}
_HEADER = ("path", "label")


@dataclass(frozen=True)
class _Row:
    line: int
    path: str  # normalised POSIX path relative to the root
    label: str
    split: str | None  # train / val / test, or None without a split column


def read_labels_csv(
    labels_file: str | os.PathLike[str],
    root: str | os.PathLike[str],
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> DatasetSplits:
    """Read a labels CSV into `DatasetSplits` under `root`. Classes are the train labels sorted by name."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}")
    labels_file = Path(labels_file)
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} is not a folder; the paths in {labels_file} are relative to it")
    rows = _read_rows(labels_file)
    _check_unique(rows, labels_file)
    _check_files_exist(rows, root, labels_file)
    by_split: dict[str, dict[str, list[Path]]] = {"train": defaultdict(list), "val": defaultdict(list),
                                                  "test": defaultdict(list)}
    for row in rows:
        by_split[row.split or "train"][row.label].append(root / PurePosixPath(row.path))
    classes = sorted(by_split["train"])
    _check_classes(rows, classes, labels_file)
    if by_split["val"]:
        train, val = _samples(by_split["train"], classes), _samples(by_split["val"], classes)
    else:
        train, val = _stratified_split({k: sorted(v) for k, v in by_split["train"].items()}, classes,
                                       val_fraction, seed)
    source = "labels" if by_split["val"] else "generated"
    return DatasetSplits(root, classes, train, val, _samples(by_split["test"], classes), source)


def _read_rows(labels_file: Path) -> list[_Row]:
    try:
        text = labels_file.read_text(encoding="utf-8-sig")  # Excel writes a byte-order mark
    except FileNotFoundError:
        raise DatasetError(f"labels file {labels_file} does not exist; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"labels file {labels_file} cannot be read as UTF-8 text ({exc}); save it as "
                           "UTF-8 CSV") from exc
    try:
        records = list(csv.reader(text.splitlines()))
    except csv.Error as exc:
        raise DatasetError(f"labels file {labels_file} is not valid CSV ({exc})") from exc
    rows = []
    has_header = bool(records) and tuple(c.strip().lower() for c in records[0][:2]) == _HEADER
    if has_header and len(records[0]) > 2 and records[0][2].strip().lower() != "split":
        raise DatasetError(f"{labels_file}, line 1: the third column must be called split, got "
                           f"{records[0][2]!r}; columns are path,label[,split]")
    for line, cells in enumerate(records, start=1):
        if (line == 1 and has_header) or not any(c.strip() for c in cells):
            continue
        rows.append(_parse_row(cells, line, labels_file))
    if not rows:
        raise DatasetError(f"labels file {labels_file} has no rows; write one path,label row per image")
    return rows


def _parse_row(cells: list[str], line: int, labels_file: Path) -> _Row:
    where = f"{labels_file}, line {line}"
    if len(cells) not in (2, 3):
        raise DatasetError(f"{where}: expected path,label or path,label,split, got {len(cells)} columns "
                           f"({','.join(cells)!r})")
    path, label = cells[0].strip(), cells[1].strip()
    if not path or not label:
        raise DatasetError(f"{where}: {'path' if not path else 'label'} is empty")
    split = None
    if len(cells) == 3:
        value = cells[2].strip().lower()
        if value not in SPLIT_NAMES:
            raise DatasetError(f"{where}: split {cells[2].strip()!r} is not one of train, val, test")
        split = SPLIT_NAMES[value]
    return _Row(line, _relative_path(path, where), label, split)


def _relative_path(path: str, where: str) -> str:
    if PurePosixPath(path).is_absolute() or PureWindowsPath(path).is_absolute() or PureWindowsPath(path).drive:
        raise DatasetError(f"{where}: {path!r} is an absolute path; write paths relative to the dataset root")
    normal = posixpath.normpath(path)
    if normal == ".." or normal.startswith("../"):
        raise DatasetError(f"{where}: {path!r} leaves the dataset root; every file must be inside it")
    if normal == ".":
        raise DatasetError(f"{where}: {path!r} is the dataset root itself, not a file")
    return normal


def _check_unique(rows: list[_Row], labels_file: Path) -> None:
    first: dict[str, _Row] = {}
    for row in rows:
        if row.path in first:
            earlier = first[row.path]
            raise DatasetError(f"{labels_file}, line {row.line}: {row.path} is already listed on line "
                               f"{earlier.line}; list every file once")
        first[row.path] = row


def _check_files_exist(rows: list[_Row], root: Path, labels_file: Path) -> None:
    missing = [row for row in rows if not (root / PurePosixPath(row.path)).is_file()]
    if missing:
        shown = "\n".join(f"  line {row.line}: {row.path}" for row in missing[:5])
        more = f"\n  ... {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DatasetError(f"{len(missing)} files listed in {labels_file} do not exist under {root}:\n"
                           f"{shown}{more}\npaths are relative to the dataset root; fix them or the root")


def _check_classes(rows: list[_Row], classes: list[str], labels_file: Path) -> None:
    if len(classes) < 2:
        raise DatasetError(f"{labels_file} has {len(classes)} training label(s) ({', '.join(classes)}); a "
                           "classifier needs at least 2")
    unknown = [row for row in rows if row.label not in classes]
    if unknown:
        row = unknown[0]
        raise DatasetError(f"{labels_file}, line {row.line}: label {row.label!r} ({row.split}) has no train "
                           "rows; the class list comes from train, so add training images of it")


def _samples(images: dict[str, list[Path]], classes: list[str]) -> list[Sample]:
    index = {name: i for i, name in enumerate(classes)}
    return [Sample(path, index[label]) for label in classes for path in sorted(images.get(label, []))]

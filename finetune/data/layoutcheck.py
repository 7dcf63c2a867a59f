"""The doctor's walk through a dataset: every image file with the split and class `fit` would give it, and
the structural findings on the way (loose files, nested folders, hidden files, OS debris, odd names).

It walks with `paths.walk_files`, as `fit` does, so it finds the files `fit` would train on; it also says
what it passes over and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import DatasetError
from .findings import Finding, finding
from .folders import _find_layout
from .images import IMAGE_EXTENSIONS
from .paths import DEBRIS_NAMES, QUARANTINE_DIR, display_path, is_ignored, is_utf8, outside, relative, walk_files

_UNSUPPORTED_EXTENSIONS = frozenset({".heic", ".heif", ".avif", ".jxl", ".svg", ".psd", ".raw", ".cr2", ".cr3",
                                     ".nef", ".arw", ".dng", ".raf", ".orf", ".jp2", ".ico", ".pdf"})


@dataclass(frozen=True)
class Entry:
    """An image file to check: where it is, and the split and class `fit` would give it."""

    path: Path
    rel: str
    split: str
    label: str


def walk_dataset(root: Path) -> tuple[list[Entry], list[Finding], dict[tuple[str, str], str]]:
    """Every image file with its split and class, the structural findings on the way, and the class
    folders found: (split, class) -> the folder's path relative to `root`."""
    try:
        layout = _find_layout(root)
    except DatasetError as exc:
        return [], [finding(".", "layout", str(exc))], {}
    entries: list[Entry] = []
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
            rel = relative(class_dir, root)
            if outside(class_dir, root):
                findings.append(finding(rel, "symlink_outside_root", "a class folder linked from outside the dataset"))
                continue
            class_dirs[(split, class_dir.name)] = rel
            entries += _class_entries(root, class_dir, split, findings)
    return entries, findings, class_dirs


def _loose_entries(root: Path, folder: Path, skip: set[Path | None], findings: list[Finding], where: str) -> list[Path]:
    """Report what lies directly in `folder` besides sub-folders; return the sub-folders (class folders)."""
    subdirs = []
    for path in _listdir(folder, root, findings):
        if path in skip or path.name == QUARANTINE_DIR:  # as `fit` skips it, at any level
            continue
        if _hidden_or_debris(path, root, findings) or _non_utf8(path, root, findings):
            continue
        if path.is_dir():
            subdirs.append(path)
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            findings.append(finding(relative(path, root), "wrong_depth", f"an image outside {where}"))
        else:
            findings.append(finding(relative(path, root), "ignored_file", _ignored_message(path)))
    return subdirs


def _class_entries(root: Path, class_dir: Path, split: str, findings: list[Finding]) -> list[Entry]:
    """Image files anywhere below one class folder, as `folders.scan_image_folder` finds them."""

    def skip(path: Path, is_dir: bool) -> bool:
        """Report what `fit` passes over (and what the doctor refuses: folder names that are not UTF-8)."""
        if _hidden_or_debris(path, root, findings) or (is_dir and _non_utf8(path, root, findings)):
            return True
        if is_ignored(path):
            return True
        if is_dir and path.parent == class_dir:
            findings.append(finding(relative(path, root), "nested_folder", f"a folder inside class {class_dir.name!r}"))
        return False

    entries = []
    for path in walk_files(class_dir, skip):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            findings.append(finding(relative(path, root), "ignored_file", _ignored_message(path)))
            continue
        entries.append(Entry(path, relative(path, root), split, class_dir.name))
    return entries


def _listdir(folder: Path, root: Path, findings: list[Finding]) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError as exc:
        findings.append(finding(relative(folder, root), "layout", f"cannot list the folder ({exc.strerror or exc})"))
        return []


def _hidden_or_debris(path: Path, root: Path, findings: list[Finding]) -> bool:
    name = path.name
    if name.lower() in DEBRIS_NAMES or name.startswith("._"):
        what = "folder" if path.is_dir() else "file"
        findings.append(finding(relative(path, root), "os_debris", f"a {what} left by the operating system"))
        return True
    if name.startswith("."):
        findings.append(finding(relative(path, root), "hidden_file", "hidden (its name starts with '.')"))
        return True
    return False


def _non_utf8(path: Path, root: Path, findings: list[Finding]) -> bool:
    if is_utf8(path.name):
        return False
    findings.append(finding(relative(path, root), "non_utf8_path",
                            f"the name is not valid UTF-8 ({display_path(path.name)})"))
    return True


def _ignored_message(path: Path) -> str:
    if path.suffix.lower() in _UNSUPPORTED_EXTENSIONS:
        return f"{path.suffix} images are not read: convert to JPEG or PNG to use it"
    return f"not an image extension fit reads ({path.suffix or 'no extension'})"

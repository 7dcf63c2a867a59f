"""The files under an image folder: which ones the toolkit reads, the one walk that finds them, and how a
path is named in a report.

`fit` (folders), `doctor` and `predict` all walk folders with `walk_files`, so a file is either seen by all
of them or by none: names starting with '.', the leftovers of operating systems (`DEBRIS_NAMES`) and
`_quarantine` folders (where `finetune doctor --quarantine` puts bad files) are passed over, and links to
folders are not followed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from .images import is_image_file

QUARANTINE_DIR = "_quarantine"
DEBRIS_NAMES = frozenset(
    name.lower()
    for name in (".DS_Store", "Thumbs.db", "ehthumbs.db", "desktop.ini", "__MACOSX", ".Spotlight-V100",
                 ".Trashes", ".fseventsd", ".AppleDouble", "@eaDir", "$RECYCLE.BIN", "System Volume Information",
                 ".ipynb_checkpoints", ".directory")
)
"""Files and folders that operating systems and tools leave behind (plus AppleDouble `._name` files)."""


def is_ignored(path: Path) -> bool:
    """True for names the toolkit never reads: hidden ('.name'), OS and tool leftovers (`DEBRIS_NAMES`, such as
    a Synology `@eaDir` of thumbnails) and `_quarantine`."""
    return path.name.startswith(".") or path.name == QUARANTINE_DIR or path.name.lower() in DEBRIS_NAMES


def walk_files(folder: Path, skip: Callable[[Path, bool], bool] | None = None) -> Iterator[Path]:
    """Every file below `folder`, in sorted path order (the order of `sorted()` on the paths).

    `folder` itself is walked whatever its name. Below it, `skip(path, is_dir)` prunes a file or a whole
    folder; the default is `is_ignored`, and a caller that reports what it passes over (the doctor) gives
    its own, which must skip at least as much. Links to files are yielded (whether they leave the dataset
    is the doctor's business); links to folders are passed over, so a link cannot make the walk loop. A
    folder that cannot be listed is passed over, as `os.walk` does.
    """
    try:
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except OSError:
        return
    for entry in entries:
        path = Path(folder, entry.name)
        is_dir = _is_dir(entry)
        if is_dir and entry.is_symlink():
            continue
        if is_ignored(path) if skip is None else skip(path, is_dir):
            continue
        if is_dir:
            yield from walk_files(path, skip)
        else:
            yield path


def walk_images(folder: Path) -> Iterator[Path]:
    """The image files (by extension, see `images.IMAGE_EXTENSIONS`) that `walk_files` finds."""
    return (path for path in walk_files(folder) if is_image_file(path))


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()  # follows links, so a link to a folder is known as one
    except OSError:
        return False


def relative(path: Path, root: Path) -> str:
    """`path` as a POSIX path relative to `root` (as reports and split files name it), else as given."""
    try:
        return PurePosixPath(Path(path).relative_to(root)).as_posix()
    except ValueError:
        return Path(path).as_posix()


def outside(path: Path, root: Path, real_root: str | None = None) -> bool:
    """True when `path`, links followed, is not inside `root` (links followed)."""
    real_root = real_root or os.path.realpath(root)
    real = os.path.realpath(path)
    return os.path.commonpath([real, real_root]) != real_root


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # os.fsdecode keeps undecodable bytes as lone surrogates
        return False
    return True


def display_path(text: str | os.PathLike[str]) -> str:
    """A printable form of any path: undecodable bytes shown as \\xNN."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")

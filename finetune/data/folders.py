"""Find the classes and images of an image folder and split them into train / val / test.

Two layouts are accepted::

    ROOT/<class>/<images>                      val is split off train (stratified, seeded)
    ROOT/train/<class>/...  ROOT/val/<class>/... (or valid/, validation/), optional ROOT/test/<class>/...

Classes are the train class folders sorted by name; label i is `classes[i]`. Names starting with '.' are
ignored everywhere, and so are `_quarantine` folders (where `finetune doctor --quarantine` puts bad files):
see `paths.walk_files`. A split
can be saved (paths relative to ROOT) and reused with `split_file=` so that a rerun trains and validates on
exactly the same images.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from ..errors import DatasetError
from ..files import atomic_write_text
from .images import IMAGE_EXTENSIONS
from .paths import is_ignored, walk_files

logger = logging.getLogger("finetune.data")

SplitSource = Literal["folders", "generated", "file", "labels"]

VAL_DIR_NAMES = ("val", "valid", "validation")
TEST_DIR_NAMES = ("test",)
SPLIT_FILE_FORMAT = "finetune.splits"
SPLIT_FILE_VERSION = 1
_LAYOUT_HINT = "expected ROOT/<class>/<images> or ROOT/train/<class>/... with ROOT/val/<class>/..."
_SUPPORTED = ", ".join(sorted(IMAGE_EXTENSIONS))


@dataclass(frozen=True)
class Sample:
    """One image file and its class index."""

    path: Path
    label: int


@dataclass(frozen=True)
class DatasetSplits:
    """The classes and the train / val / test samples of one image folder."""

    root: Path
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample] = field(default_factory=list)
    split_source: SplitSource = "generated"
    # splits of the folder left out on purpose (``finetune tune`` leaves out "test"): their images are not
    # "missing from the split file" when it is reused
    left_out: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_counts(self, split: Literal["train", "val", "test"]) -> list[int]:
        """Images per class in one split, indexed by label."""
        counts = Counter(sample.label for sample in getattr(self, split))
        return [counts.get(label, 0) for label in range(self.num_classes)]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description; sample paths are POSIX paths relative to `root`."""
        return {
            "format": SPLIT_FILE_FORMAT,
            "version": SPLIT_FILE_VERSION,
            "root": str(self.root),
            "split_source": self.split_source,
            "classes": list(self.classes),
            **{name: self._relative(getattr(self, name)) for name in ("train", "val", "test")},
            **({"left_out": list(self.left_out)} if self.left_out else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the split as JSON (atomically) and return the path."""
        path = Path(path)
        atomic_write_text(path, self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> DatasetSplits:
        """Read a split written by `save`. `root` overrides the recorded root (e.g. the folder moved)."""
        data = _read_split_file(Path(path))
        return _splits_from_dict(data, Path(root) if root is not None else Path(data["root"]), Path(path))

    def _relative(self, samples: list[Sample]) -> list[list[Any]]:
        return [[PurePosixPath(s.path.relative_to(self.root)).as_posix(), s.label] for s in samples]


@dataclass(frozen=True)
class _Layout:
    train: Path
    val: Path | None
    test: Path | None


def scan_image_folder(
    root: str | os.PathLike[str],
    val_fraction: float = 0.2,
    seed: int = 0,
    split_file: str | os.PathLike[str] | None = None,
) -> DatasetSplits:
    """Scan an image folder into `DatasetSplits`.

    Without a val folder, `val_fraction` of each class (at least one image, and at least one left for
    train) goes to val, chosen with `seed`. With `split_file` (written by `DatasetSplits.save`), that exact
    split is reused after checking that the class list and the files are unchanged.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}")
    root = _check_root(root)
    layout = _find_layout(root)
    train_images = _scan_split(layout.train)
    classes = sorted(train_images)
    val_images = _scan_split(layout.val, classes, layout.train) if layout.val else None
    test_images = _scan_split(layout.test, classes, layout.train) if layout.test else {}
    if split_file is not None:
        found = {"train": train_images, "val": val_images or {}, "test": test_images}
        return _reuse_split_file(Path(split_file), root, classes, found)
    if val_images is None:
        train, val = _stratified_split(train_images, classes, val_fraction, seed)
    else:
        train, val = _samples(train_images, classes), _samples(val_images, classes)
    source: SplitSource = "generated" if val_images is None else "folders"
    return DatasetSplits(root, classes, train, val, _samples(test_images, classes), source)


def _check_root(root: str | os.PathLike[str]) -> Path:
    path = Path(root).expanduser().absolute()
    if not path.exists():
        raise DatasetError(f"image folder {path} does not exist; check the path ({_LAYOUT_HINT})")
    if not path.is_dir():
        raise DatasetError(f"{path} is a file, not a folder; pass the folder that holds the class folders")
    if not _visible(path):
        raise DatasetError(f"image folder {path} is empty; {_LAYOUT_HINT}")
    return path


def _find_layout(root: Path) -> _Layout:
    """ROOT/train[/val|valid|validation][/test] when every visible sub-folder is a split name.

    A class that happens to be called "train" (vehicles: train, car, bus) keeps the class layout, because
    the other folders there are not split names.
    """
    subdirs = {d.name.lower(): d for d in _visible_dirs(root)}
    split_names = {"train", *VAL_DIR_NAMES, *TEST_DIR_NAMES}
    only_split_names = bool(subdirs) and set(subdirs) <= split_names
    if "train" not in subdirs and only_split_names:
        raise DatasetError(
            f"{root} has {', '.join(sorted(subdirs))} but no train/ folder; add {root / 'train'}"
        )
    if not only_split_names:
        return _Layout(root, None, None)
    vals = [subdirs[name] for name in VAL_DIR_NAMES if name in subdirs]
    if len(vals) > 1:
        names = ", ".join(d.name for d in vals)
        raise DatasetError(f"{root} has several validation folders ({names}); keep exactly one")
    return _Layout(subdirs["train"], vals[0] if vals else None, subdirs.get("test"))


def _scan_split(
    split_dir: Path, train_classes: list[str] | None = None, train_dir: Path | None = None
) -> dict[str, list[Path]]:
    """Images per class folder of one split; checks the folder is usable (and matches train's classes)."""
    class_dirs = _visible_dirs(split_dir)
    loose = [p for p in _visible(split_dir) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if not class_dirs:
        if loose:
            raise DatasetError(
                f"{split_dir} holds {len(loose)} images but no class folders; move each image into "
                f"{split_dir}/<class name>/ (one folder per class)"
            )
        files = Counter(p.suffix.lower() for p in _visible(split_dir) if p.is_file())
        seen = f" and no images with a known extension (found {_describe(files)})" if files else ""
        raise DatasetError(f"{split_dir} has no class folders{seen}; {_LAYOUT_HINT}")
    if loose:
        logger.warning("ignoring %d images directly in %s (not in a class folder)", len(loose), split_dir)
    if train_classes is not None:
        _check_known_classes(split_dir, [d.name for d in class_dirs], train_classes, train_dir)
    found = {d.name: _images_under(d) for d in class_dirs}
    _check_classes_have_images(split_dir, found)
    images = {name: paths for name, (paths, _) in found.items()}
    if train_classes is None and len(images) < 2:
        raise DatasetError(
            f"{split_dir} has a single class folder ({next(iter(images))}); a classifier needs at least "
            "2 classes: add a folder per class"
        )
    return images


def _check_known_classes(
    split_dir: Path, names: list[str], train_classes: list[str], train_dir: Path | None
) -> None:
    unknown = sorted(set(names) - set(train_classes))
    if unknown:
        raise DatasetError(
            f"{split_dir} has classes that are not in {train_dir}: {', '.join(unknown)}; the class list "
            "comes from train, so add those classes to train or remove them here"
        )
    missing = sorted(set(train_classes) - set(names))
    if missing:
        logger.warning("%s has no folder for classes %s; they are not evaluated there", split_dir, missing)


def _check_classes_have_images(split_dir: Path, found: dict[str, tuple[list[Path], Counter[str]]]) -> None:
    empty = {name: others for name, (paths, others) in found.items() if not paths}
    if not empty:
        return
    if len(empty) == len(found):
        others = sum(empty.values(), Counter())
        seen = f"found only {_describe(others)}" if others else "the class folders are empty"
        raise DatasetError(
            f"no images with a known extension under {split_dir}: {seen}; supported: {_SUPPORTED} "
            "(convert the images or check the path)"
        )
    lines = [
        f"  {split_dir / name}: " + (f"only {_describe(o)}" if o else "empty") for name, o in empty.items()
    ]
    raise DatasetError(
        "class folders without images:\n" + "\n".join(lines) + f"\nadd images ({_SUPPORTED}) or remove them"
    )


def _describe(extensions: Counter[str]) -> str:
    return ", ".join(f"{ext or '(no extension)'} ({n})" for ext, n in extensions.most_common(5))


def _images_under(class_dir: Path) -> tuple[list[Path], Counter[str]]:
    """Image files anywhere below a class folder (sorted), and a count of other file extensions."""
    images: list[Path] = []
    others: Counter[str] = Counter()
    for path in walk_files(class_dir):
        suffix = os.path.splitext(path.name)[1].lower()
        if suffix in IMAGE_EXTENSIONS:
            images.append(path)
        else:
            others[suffix] += 1
    return images, others


def _visible(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not is_ignored(p))
    except OSError as exc:
        raise DatasetError(
            f"cannot list folder {folder} ({exc.strerror or exc}); check its permissions"
        ) from exc


def _visible_dirs(folder: Path) -> list[Path]:
    return [p for p in _visible(folder) if p.is_dir()]


def _samples(images: dict[str, list[Path]], classes: list[str]) -> list[Sample]:
    return [Sample(path, label) for label, name in enumerate(classes) for path in images.get(name, [])]


def _stratified_split(
    images: dict[str, list[Path]], classes: list[str], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Per class: shuffle with a generator seeded by (seed, class name), so adding a class leaves the
    split of the others unchanged; round to nearest but keep at least one image on each side."""
    too_small = [name for name in classes if len(images[name]) < 2]
    if too_small:
        folders = ", ".join(str(images[name][0].parent) for name in too_small)
        raise DatasetError(
            f"classes {', '.join(too_small)} have a single image ({folders}); each class needs at least 2 "
            "images to put one in train and one in val: add images, or provide a val/ folder"
        )
    train: list[Sample] = []
    val: list[Sample] = []
    for label, name in enumerate(classes):
        order = list(images[name])
        random.Random(f"{seed}/{name}").shuffle(order)
        n_val = min(max(1, math.floor(len(order) * val_fraction + 0.5)), len(order) - 1)
        val += [Sample(p, label) for p in sorted(order[:n_val])]
        train += [Sample(p, label) for p in sorted(order[n_val:])]
    return train, val


def _reuse_split_file(
    split_file: Path, root: Path, classes: list[str], found: dict[str, dict[str, list[Path]]]
) -> DatasetSplits:
    data = _read_split_file(split_file)
    if data["classes"] != classes:
        added = sorted(set(classes) - set(data["classes"]))
        removed = sorted(set(data["classes"]) - set(classes))
        change = f"added: {added or 'none'}, removed: {removed or 'none'}"
        if not added and not removed:
            change = "same names in a different order"
        raise DatasetError(
            f"the classes in {root} differ from split file {split_file} ({change}); "
            "make a new split by running without the split file"
        )
    splits = _splits_from_dict(data, root, split_file)
    listed = {s.path for samples in (splits.train, splits.val, splits.test) for s in samples}
    used = {p for name, images in found.items() if name not in splits.left_out for ps in images.values() for p in ps}
    unlisted = used - listed
    if unlisted:
        logger.warning(
            "%d images in %s are not in split file %s and are not used (e.g. %s); run without the split "
            "file to include them",
            len(unlisted),
            root,
            split_file,
            min(unlisted),
        )
    return splits


def _read_split_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"split file {path} does not exist; write one with DatasetSplits.save()") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(
            f"split file {path} cannot be read as JSON ({exc}); delete it to re-split"
        ) from exc
    if not isinstance(data, dict) or data.get("format") != SPLIT_FILE_FORMAT:
        raise DatasetError(f'{path} is not a finetune split file (no "format": "{SPLIT_FILE_FORMAT}")')
    if data.get("version") != SPLIT_FILE_VERSION:
        raise DatasetError(
            f"split file {path} has version {data.get('version')!r}; this finetune reads version "
            f"{SPLIT_FILE_VERSION}: make a new split by running without the split file"
        )
    return data


def _splits_from_dict(data: dict[str, Any], root: Path, source: Path) -> DatasetSplits:
    """Rebuild samples under `root`; every listed file must still exist."""
    classes = [str(name) for name in data["classes"]]
    lists = {
        name: _file_samples(data.get(name, []), root, len(classes), source)
        for name in ("train", "val", "test")
    }
    missing = [s.path for samples in lists.values() for s in samples if not s.path.is_file()]
    if missing:
        shown = "\n".join(f"  {p}" for p in missing[:5]) + (
            f"\n  ... {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise DatasetError(
            f"{len(missing)} files listed in split file {source} no longer exist:\n{shown}\n"
            "restore them, or make a new split by running without the split file"
        )
    return DatasetSplits(root, classes, lists["train"], lists["val"], lists["test"], "file",
                         tuple(str(name) for name in data.get("left_out", [])))


def _file_samples(rows: list[Any], root: Path, num_classes: int, source: Path) -> list[Sample]:
    samples = []
    for row in rows:
        if not (
            isinstance(row, list) and len(row) == 2 and isinstance(row[1], int) and 0 <= row[1] < num_classes
        ):
            raise DatasetError(f"split file {source} has a malformed entry {row!r}; expected [path, label]")
        samples.append(Sample(root / PurePosixPath(row[0]), row[1]))
    return samples

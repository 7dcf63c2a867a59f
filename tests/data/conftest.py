"""Tiny generated image folders for the data tests."""

from __future__ import annotations

import importlib.util
import io
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def load_script(name: str) -> ModuleType:
    """Import scripts/<name>.py (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def save_png(path: Path, rgb: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (12, 16)) -> Path:
    """A solid (H, W) = size image; its colour identifies it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size[1], size[0]), rgb).save(path)
    return path


@pytest.fixture
def write_png() -> Callable[..., Path]:
    """write_png(path, rgb=(200, 30, 30), size=(h, w)) writes a solid-colour PNG, creating folders."""
    return save_png


@pytest.fixture
def make_class_folder() -> Callable[..., Path]:
    """make_class_folder(root, {"cat": 5, "dog": 3}, ext=".png") writes solid-colour images per class."""

    def make(root: Path, counts: dict[str, int], ext: str = ".png") -> Path:
        for label, (name, count) in enumerate(sorted(counts.items())):
            for i in range(count):
                save_png(root / name / f"{name}_{i:03d}{ext}", (20 * label, 7 * i % 256, 100))
        return root

    return make


def jpeg_bytes(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, **options)
    return buffer.getvalue()


@pytest.fixture
def exif_pattern() -> Image.Image:
    """The image stored (before EXIF rotation) in the exif6/exif8 files of `mixed_folder`."""
    return orientation_pattern()


def orientation_pattern() -> Image.Image:
    """40 wide x 20 tall: red top half, blue bottom half, green block in the top-left corner."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:10] = (255, 0, 0)
    pixels[10:] = (0, 0, 255)
    pixels[:8, :8] = (0, 255, 0)
    return Image.fromarray(pixels)


@pytest.fixture
def mixed_folder(tmp_path: Path) -> dict[str, Path]:
    """One file per decoding case; keys starting with 'bad_' must fail to decode."""
    d = tmp_path / "mixed"
    d.mkdir()
    files: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        files[name] = d / name
        files[name].write_bytes(data)

    good = jpeg_bytes(Image.new("RGB", (64, 48), (10, 120, 240)))
    put("rgb.jpg", good)
    put("bad_truncated.jpg", good[: len(good) // 2])
    put("bad_empty.jpg", b"")
    put("bad_text.jpg", b"this is not an image, just text with a .jpg name\n")
    put("cmyk.jpg", jpeg_bytes(Image.new("CMYK", (32, 24), (0, 255, 255, 0))))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    put("exif6.jpg", jpeg_bytes(orientation_pattern(), exif=exif.tobytes()))
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise to display
    put("exif8.jpg", jpeg_bytes(orientation_pattern(), exif=exif.tobytes()))
    _write_pillow_cases(d, files)
    return files


def _write_pillow_cases(d: Path, files: dict[str, Path]) -> None:
    gradient = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))
    Image.fromarray(gradient).save(files.setdefault("gray16.png", d / "gray16.png"))
    rgba = Image.new("RGBA", (8, 8), (0, 128, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black -> white
    rgba.save(files.setdefault("rgba.png", d / "rgba.png"))
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.save(files.setdefault("palette.png", d / "palette.png"), transparency=0)
    Image.new("L", (10, 6), 77).save(files.setdefault("gray.png", d / "gray.png"))
    Image.new("1", (10, 6), 1).save(files.setdefault("bilevel.png", d / "bilevel.png"))
    Image.new("LA", (5, 5), (100, 0)).save(files.setdefault("gray_alpha.png", d / "gray_alpha.png"))
    frames = [Image.new("RGB", (9, 9), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(
        files.setdefault("animated.gif", d / "animated.gif"), save_all=True, append_images=frames[1:]
    )
    floats = np.tile(np.linspace(0, 1, 16, dtype=np.float32), (3, 1))
    Image.fromarray(floats).save(files.setdefault("float.tif", d / "float.tif"))
    Image.new("RGB", (7, 5), (1, 2, 3)).save(files.setdefault("upper.PNG", d / "upper.PNG"))


@pytest.fixture(scope="session")
def fashion_mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,000 train + 100 val Fashion-MNIST images written by scripts/make_fashion_mnist.py from the IDX files
    of the Debian package; skips (never installs it) where they are absent."""
    script = load_script("make_fashion_mnist")
    if not script._has_idx_files(script.DEFAULT_SOURCE):
        pytest.skip(f"real data missing: no Fashion-MNIST IDX files in {script.DEFAULT_SOURCE} "
                    f"(apt-get install {script.DEBIAN_PACKAGE})")
    out = tmp_path_factory.mktemp("fmnist") / "fashion-mnist"
    script.main(["--out", str(out), "--per-class", "100", "--val-per-class", "10"])
    return out

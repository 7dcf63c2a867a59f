"""Write a small image dataset with one example of every problem `finetune doctor` finds, mixed into a good
train/val folder, and list what the doctor should report.

    python scripts/make_doctor_corpus.py /tmp/corpus && finetune doctor /tmp/corpus

`EXPECTED` is the list of (path, kind) findings; the tests check the doctor reports exactly these.
A file outside the corpus, ROOT-outside.jpg next to ROOT, is the target of the symbolic link.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200), "yellow": (220, 210, 40)}
NON_UTF8_NAME = b"caf\xe9.png"  # Latin-1 e-acute: not valid UTF-8
PERMISSION_FILE = "train/blue/locked.png"

EXPECTED: list[tuple[str, str]] = [
    ("train/red/empty.jpg", "empty_file"),
    ("train/red/truncated.jpg", "truncated"),
    ("train/green/corrupt.png", "corrupt"),
    ("train/green/notes.jpg", "not_an_image"),
    ("train/blue/phone.jpg", "unsupported_format"),
    (PERMISSION_FILE, "permission_denied"),
    ("train/red/gray.png", "grayscale"),
    ("train/red/palette.png", "palette"),
    ("train/green/rgba.png", "rgba"),
    ("train/green/cmyk.jpg", "cmyk"),
    ("train/blue/gray16.png", "16_bit"),
    ("train/blue/rotated.jpg", "exif_rotated"),
    ("train/red/animated.gif", "animated"),
    ("train/green/tiny.png", "too_small"),
    ("train/blue/banner.png", "extreme_aspect"),
    ("train/red/bomb.png", "decompression_bomb"),
    ("train/green/linked.jpg", "symlink_outside_root"),
    ("train/blue/" + os.fsdecode(NON_UTF8_NAME), "non_utf8_path"),
    ("train/empty_class", "empty_class"),
    ("train/yellow", "few_images"),
    ("train/red/.hidden.png", "hidden_file"),
    ("train/red/.DS_Store", "os_debris"),
    ("train/blue/Thumbs.db", "os_debris"),
    ("train/blue/extra", "nested_folder"),
    ("train/stray.png", "wrong_depth"),
    ("train/green/same.png", "conflicting_labels"),
    ("train/red/same.png", "conflicting_labels"),
    ("val/blue/leak.png", "leakage"),
    ("val/red/near.jpg", "leakage"),
    ("train/green/copy_b.png", "duplicate"),
    (".", "class_imbalance"),
]


def noise(rng: np.random.Generator, colour: tuple[int, int, int], size: tuple[int, int] = (48, 48)) -> np.ndarray:
    """(H, W, 3) uint8: a colour plus strong noise, so that no two images look alike."""
    pixels = np.array(colour) + rng.normal(0, 40, (*size, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def smooth(rng: np.random.Generator, size: int = 96) -> Image.Image:
    """A smooth random picture (blobs, no pixel noise): what perceptual hashes are made for."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    return coarse.resize((size, size), Image.Resampling.BICUBIC)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels: a decompression bomb as the header shows it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\x00" * 4096, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def make_good(root: Path, rng: np.random.Generator, per_class: int = 32) -> None:
    """root/{train,val}/{red,green,blue}: 24 train + 8 val images per class, half PNG, half JPEG: enough that
    the bad files stay under the share that stops `fit` (`doctor.MAX_UNUSABLE_FRACTION`)."""
    for name in ("red", "green", "blue"):
        for i in range(per_class):
            split = "val" if i % 4 == 0 else "train"
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            fmt, ext = ("JPEG", ".jpg") if i % 2 else ("PNG", ".png")
            (folder / f"{i:02d}{ext}").write_bytes(encode(Image.fromarray(noise(rng, COLOURS[name])), fmt))


def make_corpus(root: Path, seed: int = 0) -> Path:
    """Write the corpus under `root` (which must not exist yet); return root."""
    root = Path(root)
    if root.exists():
        raise FileExistsError(f"{root} exists; pass a new folder")
    rng = np.random.default_rng(seed)
    make_good(root, rng)
    t = root / "train"

    def put(rel: str, data: bytes) -> Path:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def image(colour: str = "red", size: tuple[int, int] = (48, 48)) -> Image.Image:
        return Image.fromarray(noise(rng, COLOURS[colour], size))

    # unreadable
    put("train/red/empty.jpg", b"")
    whole = encode(image(), "JPEG")
    put("train/red/truncated.jpg", whole[: len(whole) // 2])
    png = bytearray(encode(image("green"), "PNG"))
    start = png.find(b"IDAT") + 20
    png[start : start + 40] = bytes(b ^ 0x55 for b in png[start : start + 40])  # garbage compressed data
    put("train/green/corrupt.png", bytes(png))
    put("train/green/notes.jpg", b"meeting notes, saved with the wrong extension\n")
    put("train/blue/phone.jpg", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(512))
    put(PERMISSION_FILE, encode(image("blue"), "PNG")).chmod(0)
    # convertible
    put("train/red/gray.png", encode(image().convert("L"), "PNG"))
    put("train/red/palette.png", encode(image().quantize(64), "PNG"))
    rgba = noise(rng, COLOURS["green"])
    put("train/green/rgba.png", encode(Image.fromarray(np.dstack([rgba, rgba[:, :, :1]]), "RGBA"), "PNG"))
    put("train/green/cmyk.jpg", encode(image("green").convert("CMYK"), "JPEG"))
    deep = (np.linspace(0, 60000, 48)[None, :] + rng.normal(0, 3000, (48, 48))).clip(0, 65535)
    put("train/blue/gray16.png", encode(Image.fromarray(deep.astype(np.uint16)), "PNG"))
    exif = Image.Exif()
    exif[0x0112] = 6
    put("train/blue/rotated.jpg", encode(image("blue", (48, 64)), "JPEG", exif=exif.tobytes()))
    frames = [image(), image()]
    put("train/red/animated.gif", encode(frames[0], "GIF", save_all=True, append_images=frames[1:]))
    put("train/green/tiny.png", encode(image("green", (16, 16)), "PNG"))
    put("train/blue/banner.png", encode(image("blue", (40, 240)), "PNG"))
    # dangerous
    put("train/red/bomb.png", png_claiming(40_000, 40_000))
    outside = root.parent / f"{root.name}-outside.jpg"
    outside.write_bytes(encode(image("green"), "JPEG"))
    (t / "green" / "linked.jpg").symlink_to(os.path.relpath(outside, t / "green"))
    with open(os.path.join(os.fsencode(t / "blue"), NON_UTF8_NAME), "wb") as f:
        f.write(encode(image("blue"), "PNG"))
    # structural
    (t / "empty_class").mkdir()
    for i in range(4):
        put(f"{'val' if i == 3 else 'train'}/yellow/{i}.png", encode(image("yellow"), "PNG"))
    put("train/red/.hidden.png", encode(image(), "PNG"))
    put("train/red/.DS_Store", b"\x00\x00\x00\x01Bud1" + bytes(64))
    put("train/blue/Thumbs.db", b"\xd0\xcf\x11\xe0" + bytes(64))
    put("train/blue/extra/00.png", encode(image("blue"), "PNG"))
    put("train/stray.png", encode(image("green"), "PNG"))
    # labels
    same = encode(image(), "PNG")
    put("train/red/same.png", same)
    put("train/green/same.png", same)
    leak = encode(image("blue"), "PNG")
    put("train/blue/leak.png", leak)
    put("val/blue/leak.png", leak)
    picture = smooth(rng)
    put("train/red/near.jpg", encode(picture, "JPEG", quality=95))
    put("val/red/near.jpg", encode(picture.resize((86, 86), Image.Resampling.LANCZOS), "JPEG", quality=70))
    copy = encode(image("green"), "PNG")
    put("train/green/copy_a.png", copy)
    put("train/green/copy_b.png", copy)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="new folder to write the corpus into")
    parser.add_argument("--force", action="store_true", help="replace ROOT if it exists")
    args = parser.parse_args(argv)
    if args.force and args.root.exists():
        for path in args.root.rglob("*"):
            if not path.is_symlink():
                path.chmod(0o755 if path.is_dir() else 0o644)
        shutil.rmtree(args.root)
    make_corpus(args.root)
    print(f"wrote {args.root}: {len(EXPECTED)} findings expected")
    return 0


if __name__ == "__main__":
    sys.exit(main())

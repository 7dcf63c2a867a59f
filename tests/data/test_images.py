from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.data import images
from finetune.data.images import IMAGE_EXTENSIONS, is_image_file, load_rgb
from finetune.errors import FinetuneError, ImageDecodeError


def test_every_file_decodes_to_uint8_rgb_and_exactly_the_bad_ones_fail(mixed_folder: dict[str, Path]) -> None:
    for name, path in mixed_folder.items():
        if name.startswith("bad_"):
            with pytest.raises(ImageDecodeError) as info:
                load_rgb(path)
            assert info.value.path == path
            assert str(path) in str(info.value)
            assert isinstance(info.value, FinetuneError)
        else:
            array = load_rgb(path)
            assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3, name
            assert array.flags.c_contiguous


@pytest.mark.parametrize(
    ("name", "reason"),
    [("bad_empty.jpg", "empty"), ("bad_truncated.jpg", "truncated"), ("bad_text.jpg", "not an image")],
)
def test_bad_files_have_a_short_reason(mixed_folder: dict[str, Path], name: str, reason: str) -> None:
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(mixed_folder[name])
    assert reason in info.value.reason


def test_plain_jpeg_colour(mixed_folder: dict[str, Path]) -> None:
    array = load_rgb(mixed_folder["rgb.jpg"])
    assert array.shape == (48, 64, 3)
    assert np.abs(array.astype(int) - (10, 120, 240)).max() <= 3


def test_cmyk_jpeg_becomes_rgb(mixed_folder: dict[str, Path]) -> None:
    array = load_rgb(mixed_folder["cmyk.jpg"])  # C=0 M=Y=255 K=0 is red
    assert array.shape == (24, 32, 3)
    assert np.abs(array.astype(int) - (255, 0, 0)).max() <= 3


def test_16_bit_png_is_scaled_not_clipped(mixed_folder: dict[str, Path]) -> None:
    array = load_rgb(mixed_folder["gray16.png"])
    expected = np.rint(np.linspace(0, 65535, 256).round() * 255 / 65535).astype(np.uint8)
    assert array.shape == (4, 256, 3)
    np.testing.assert_array_equal(array[0, :, 0], expected)
    np.testing.assert_array_equal(array[..., 0], array[..., 2])
    assert array[0, 0, 0] == 0 and array[0, -1, 0] == 255 and array[0, 128, 0] == 128


def test_transparency_composites_on_white(mixed_folder: dict[str, Path]) -> None:
    rgba = load_rgb(mixed_folder["rgba.png"])
    assert tuple(rgba[0, 0]) == (255, 255, 255)
    assert tuple(rgba[4, 4]) == (0, 128, 0)
    palette = load_rgb(mixed_folder["palette.png"])
    assert tuple(palette[0, 0]) == (255, 255, 255)
    assert tuple(palette[1, 1]) == (255, 0, 0)
    assert tuple(load_rgb(mixed_folder["gray_alpha.png"])[2, 2]) == (255, 255, 255)


def test_grayscale_modes_repeat_the_channel(mixed_folder: dict[str, Path]) -> None:
    assert tuple(load_rgb(mixed_folder["gray.png"])[0, 0]) == (77, 77, 77)
    assert tuple(load_rgb(mixed_folder["bilevel.png"])[0, 0]) == (255, 255, 255)


def test_animated_gif_gives_the_first_frame(mixed_folder: dict[str, Path]) -> None:
    array = load_rgb(mixed_folder["animated.gif"])
    assert array.shape == (9, 9, 3) and tuple(array[4, 4]) == (255, 0, 0)


def test_float_tiff_in_unit_range_is_scaled_by_255(mixed_folder: dict[str, Path]) -> None:
    array = load_rgb(mixed_folder["float.tif"])
    np.testing.assert_array_equal(array[0, :, 1], np.rint(np.linspace(0, 1, 16) * 255).astype(np.uint8))


def _quadrant_colours(array: np.ndarray) -> dict[str, tuple[int, ...]]:
    h, w = array.shape[:2]
    corners = {
        "top_left": (0, 0),
        "top_right": (0, w - 1),
        "bottom_left": (h - 1, 0),
        "bottom_right": (h - 1, w - 1),
    }
    return {k: tuple(int(round(v / 255)) for v in array[y, x]) for k, (y, x) in corners.items()}


@pytest.mark.parametrize(
    ("name", "transpose"),
    [("exif6.jpg", Image.Transpose.ROTATE_270), ("exif8.jpg", Image.Transpose.ROTATE_90)],
)
def test_exif_orientation_is_applied(
    mixed_folder: dict[str, Path], exif_pattern: Image.Image, name: str, transpose: Image.Transpose
) -> None:
    array = load_rgb(mixed_folder[name])
    assert array.shape == (40, 20, 3)  # stored 40 wide x 20 tall, displayed 20 wide x 40 tall
    expected = np.asarray(exif_pattern.transpose(transpose))
    assert _quadrant_colours(array) == _quadrant_colours(expected)
    if name == "exif6.jpg":
        # Clockwise: the red top edge goes to the right, the green top-left block to the top-right.
        assert _quadrant_colours(array) == {
            "top_left": (0, 0, 1), "top_right": (0, 1, 0), "bottom_left": (0, 0, 1), "bottom_right": (1, 0, 0)
        }  # fmt: skip


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="not found"):
        load_rgb(tmp_path / "nope.png")
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    with pytest.raises(ImageDecodeError, match="directory"):
        load_rgb(folder)


def test_permission_denied_is_a_decode_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(path)

    def deny(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    # Root ignores file modes, so simulate what open() raises for an unreadable file.
    monkeypatch.setattr(images.Image, "open", deny)
    with pytest.raises(ImageDecodeError, match="permission denied"):
        load_rgb(path)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file_is_a_decode_error(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(path)
    path.chmod(0)
    with pytest.raises(ImageDecodeError, match="permission denied"):
        load_rgb(path)


def test_decompression_bomb_is_a_decode_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 pixels > 2 x limit: Pillow refuses
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        load_rgb(path)


def test_decode_error_pickles_with_its_fields() -> None:
    error = pickle.loads(pickle.dumps(ImageDecodeError(Path("/x/y.jpg"), "truncated")))
    assert error.path == Path("/x/y.jpg") and error.reason == "truncated"


def test_extensions_are_case_insensitive() -> None:
    assert {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"} == set(IMAGE_EXTENSIONS)
    assert is_image_file("a/B.JPG") and is_image_file("x.Tiff") and not is_image_file("notes.txt")


def test_our_pixel_limit_refuses_from_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(images, "MAX_PIXELS", 5000)  # Pillow's own limit is untouched: ours applies
    with pytest.raises(ImageDecodeError, match="refused without decoding") as info:
        load_rgb(path)
    assert info.value.kind == "decompression_bomb"


@pytest.mark.parametrize(("name", "kind"), [("bad_empty.jpg", "empty_file"), ("bad_truncated.jpg", "truncated"),
                                            ("bad_text.jpg", "not_an_image")])
def test_decode_errors_carry_a_kind(mixed_folder: dict[str, Path], name: str, kind: str) -> None:
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(mixed_folder[name])
    assert info.value.kind == kind
    assert pickle.loads(pickle.dumps(info.value)).kind == kind

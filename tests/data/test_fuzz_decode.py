"""Damaged JPEG, PNG and WebP bytes (truncated, bit-flipped, spliced): the loader raises only
`ImageDecodeError` and the doctor's file check never raises, and the two agree. 600 examples in all."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from finetune.data.filecheck import check_file
from finetune.data.images import load_rgb
from finetune.errors import ImageDecodeError


def _valid_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    pixels = np.clip(rng.normal(128, 60, (24, 32, 3)), 0, 255).astype(np.uint8)
    files = {}
    for fmt, options in (("JPEG", {"quality": 90}), ("PNG", {}), ("WEBP", {"quality": 80}),
                         ("WEBP", {"lossless": True})):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=fmt, **options)
        files[f"{fmt}{'-lossless' if options.get('lossless') else ''}"] = buffer.getvalue()
    return files


VALID = _valid_files()
FORMATS = st.sampled_from(sorted(VALID))
EXAMPLES = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One file, rewritten for every example."""
    return tmp_path_factory.mktemp("fuzz") / "sample.img"


def _check(path: Path, data: bytes) -> None:
    """Both readers on the same bytes: only the documented error, and the same verdict."""
    path.write_bytes(data)
    try:
        load_rgb(path)
        loaded = True
    except ImageDecodeError as exc:
        assert exc.path == path and exc.reason
        loaded = False
    check = check_file(path)
    assert check.readable == loaded, check.issues
    if not loaded:
        assert check.issues and check.issues[0][0] in {"empty_file", "truncated", "corrupt", "not_an_image",
                                                       "unsupported_format", "decompression_bomb", "unreadable"}


@EXAMPLES
@given(fmt=FORMATS, fraction=st.floats(0, 1))
def test_truncated(path: Path, fmt: str, fraction: float) -> None:
    data = VALID[fmt]
    _check(path, data[: int(len(data) * fraction)])


@EXAMPLES
@given(fmt=FORMATS, flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
                                   min_size=1, max_size=12))
def test_bit_flipped(path: Path, fmt: str, flips: list[tuple[float, int]]) -> None:
    data = bytearray(VALID[fmt])
    for where, bit in flips:
        data[int(where * len(data))] ^= 1 << bit
    _check(path, bytes(data))


@EXAMPLES
@given(first=FORMATS, second=FORMATS, cut=st.floats(0, 1), resume=st.floats(0, 1), junk=st.binary(max_size=64))
def test_spliced(path: Path, first: str, second: str, cut: float, resume: float, junk: bytes) -> None:
    a, b = VALID[first], VALID[second]
    _check(path, a[: int(len(a) * cut)] + junk + b[int(len(b) * resume) :])


def test_the_valid_files_decode(path: Path) -> None:
    for data in VALID.values():
        _check(path, data)
        assert check_file(path).readable

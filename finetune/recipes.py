"""Recipes: the four transfer-learning cases as data.

A recipe is a frozen dataclass. The built-in ones live in the top-level ``recipes/`` folder as TOML files
(shipped inside the wheel as ``finetune/_recipes``); any other TOML file with the same keys is a recipe too.
Overrides go field by field (``recipe.override({"lr": "3e-4"})`` or ``dataclasses.replace``) and are
validated exactly like a file.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import tomllib

from .errors import RecipeError

OPTIMIZERS = ("adamw", "sgd")
HEADS = ("linear", "multistage")
BALANCE = ("auto", "none", "sampler", "loss_weights")
CROPS = ("auto", "center", "whole")

# Below this many training images per class a recipe is "small": fine-tuning millions of pretrained
# weights on a few hundred images overfits and costs minutes per epoch on a CPU, while a head on frozen
# ImageNet features is already strong (Kornblith et al. 2019: the gain of fine-tuning over a fixed
# feature extractor grows with the size of the target data set).
SMALL_DATA_IMAGES_PER_CLASS = 250


@dataclass(frozen=True)
class Recipe:
    """Everything that decides how a pretrained backbone is adapted; nothing about the data's location."""

    name: str
    description: str = ""
    # backbone
    model: str = "tf_efficientnet_lite0"
    pretrained: bool = True
    # an ensemble: more backbones, comma-separated, run frozen beside ``model`` on the same input; the head reads
    # the features of all of them (fit --ensemble A,B,...: model = A, ensemble = "B,...")
    ensemble: str = ""
    # schedule
    epochs: int = 10
    # training images the Lightning epochs see in all, at most: on a large training set the epochs are cut to
    # max_train_images // images (at least 1), so the schedule fits a compute budget; 0 = no cap
    max_train_images: int = 0
    batch_size: int = 32
    freeze_epochs: int = 0  # epochs of head-only training before anything is unfrozen
    unfreeze_stages: int = 0  # stages unfrozen after freeze_epochs, counted from the top; -1 = all, 0 = none
    # optimisation
    optimizer: str = "adamw"
    lr: float = 1e-3  # the head's learning rate
    backbone_lr_scale: float = 0.1  # top pretrained stage trains at lr * this
    layer_decay: float = 1.0  # each stage further down gets this factor once more
    weight_decay: float = 0.05
    momentum: float = 0.9  # SGD only (Nesterov)
    warmup_epochs: float = 0.5  # linear warm-up of every group from the moment it starts training
    min_lr_ratio: float = 0.01  # cosine decays to lr * this
    label_smoothing: float = 0.0
    # head
    head: str = "linear"
    head_stages: int = 3  # multistage head: pooled outputs of this many top feature stages + final features
    head_dropout: float = 0.0
    drop_path: float = 0.0
    # an exponential moving average of the weights (timm's ModelEmaV3) when the backbone trains; 0 = off. Its
    # decay ramps up as 1 - (1 + step)^-3/4 to at most this; it is scored beside the raw weights every epoch and
    # the better of the two is kept and exported
    ema_decay: float = 0.0
    # several processes (fit --devices/--num-nodes): BatchNorm statistics of trained stages over the global batch
    sync_batchnorm: bool = True
    # input side in pixels when the backbone trains; 0: chosen from the images' native size (resolution.py)
    resolution: int = 0
    # how an image becomes the input at evaluation, prediction and export: "center" (the backbone's centre crop,
    # timm's ImageNet convention), "whole" (the whole image resized, no border cut) or "auto" (from the images'
    # size: resolution.py)
    crop: str = "auto"
    # augmentation
    scale_min: float = 0.5  # RandomResizedCrop lower scale bound
    hflip: float = 0.5
    color_jitter: float = 0.1
    # stopping
    early_stopping: int = 0  # patience in epochs on the validation accuracy; 0 = off
    # the divergence guard (model/guard.py): stop when the smoothed training loss passes this x the phase's
    # first steps' (at least ln C), or is NaN; exit status 3. 0 = off
    divergence_factor: float = 3.0
    gradient_clip: float = 0.0  # clip the global gradient norm to this (Lightning's gradient_clip_val); 0 = off
    # class imbalance above finetune.data.balance.IMBALANCE_RATIO: "auto" (sampler in epochs, class-weighted
    # loss in the probe), "none", "sampler" or "loss_weights" (class-weighted loss everywhere)
    balance: str = "auto"
    # frozen phases on cached features: the backbone runs once, the head is fitted by L-BFGS (see model/probe.py)
    cached_features: bool = True
    flip_views: bool = True  # the probe also trains on each training image's mirror image (one more pass)
    feature_views: int = 0  # views with the crop + colour jitter above, added to the probe's training set
    # the probe's weight decay (on standardised features); 0: chosen on validation from model/probe.py's
    # WEIGHT_DECAYS, 1e-3 to 1 (what `finetune tune` searches on the probe path, on a log scale)
    probe_weight_decay: float = 0.0
    # recipes that fine-tune their top stages: the frozen layers below them run once, over this many augmented
    # views of each training image, and the epochs train on the cached activations (phases/frozen_cache.py)
    frozen_cache_views: int = 0
    # evaluation, prediction and the exported model average each image's logits with its mirror image's
    test_flip: bool = True

    def __post_init__(self) -> None:
        _validate(self)

    def override(self, values: Mapping[str, Any]) -> Recipe:
        """Return a copy with ``values`` applied; strings are parsed to the field's type (``--set``)."""
        known = {f.name: f for f in fields(self)}
        parsed = {}
        for key, value in values.items():
            if key not in known:
                raise RecipeError(
                    f"unknown recipe field {key!r}; known fields: {', '.join(sorted(known))}"
                )
            parsed[key] = _parse(key, known[key].type, value)
        return dataclasses.replace(self, **parsed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The fields that act on this recipe's training path (``active_fields``), as a recipe file; the
        others are named in a last comment line (loading the file gives them their defaults, which act on
        nothing either)."""
        values = self.to_dict()
        active = self.active_fields()
        lines = [f"{key} = {_toml_value(values[key])}" for key in values if key in active]
        idle = [key for key in values if key not in active]
        if idle:
            lines.append(f"# not used on this training path: {', '.join(idle)}")
        return "\n".join(lines) + "\n"

    @property
    def trains_backbone(self) -> bool:
        return self.unfreeze_stages != 0 and self.freeze_epochs < self.epochs

    @property
    def probes(self) -> bool:
        """Whether a head is fitted on cached features (the frozen phase of every built-in recipe)."""
        return self.cached_features and (not self.trains_backbone or self.freeze_epochs > 0)

    def lightning_epochs(self, train_images: int, probed: bool) -> int:
        """The epochs Lightning runs on ``train_images`` images: the recipe's (less the head warm-up when a probe
        replaced it), cut so that they see at most ``max_train_images`` images."""
        epochs = self.epochs - (self.freeze_epochs if probed else 0)
        if self.max_train_images and train_images:
            epochs = min(epochs, max(1, self.max_train_images // train_images))
        return epochs

    @property
    def frozen_part_cacheable(self) -> bool:
        """Whether ``frozen_cache_views`` acts: only some stages train (a frozen part exists below them), with a
        linear head (a multi-stage head reads frozen stages) and without test-time flips (a cached activation
        cannot be mirrored)."""
        return self.trains_backbone and self.unfreeze_stages > 0 and self.head == "linear" and not self.test_flip

    @property
    def ensemble_members(self) -> list[str]:
        """The backbones after ``model`` (``ensemble``, split at the commas)."""
        return [name.strip() for name in self.ensemble.split(",")] if self.ensemble.strip() else []

    @property
    def uses_ema(self) -> bool:
        return self.ema_decay > 0 and self.trains_backbone

    @property
    def caches_frozen_part(self) -> bool:
        return self.frozen_cache_views > 0 and self.frozen_part_cacheable

    @property
    def trains_epochs(self) -> bool:
        """Whether Lightning epochs run: to train the backbone, or a head on uncached features."""
        return self.trains_backbone or not self.cached_features

    def active_fields(self) -> tuple[str, ...]:
        """The fields whose value changes what this recipe does, given its other values: the probe's fields
        when a head is fitted on cached features, the optimiser's and the augmentation's when epochs run."""
        names = ["name", "description", "model", "pretrained", "ensemble", "unfreeze_stages", "head", "balance",
                 "cached_features", "test_flip", "crop"]
        if self.head == "multistage":
            names.append("head_stages")
        if self.probes:
            names += ["flip_views", "feature_views", "probe_weight_decay"]
        if self.trains_epochs:
            names += ["epochs", "max_train_images", "batch_size", "optimizer", "lr", "weight_decay", "warmup_epochs",
                      "min_lr_ratio", "label_smoothing", "head_dropout", "early_stopping", "divergence_factor",
                      "gradient_clip"]
            names += ["momentum"] if self.optimizer == "sgd" else []
        if self.trains_backbone:
            names += ["freeze_epochs", "backbone_lr_scale", "drop_path", "sync_batchnorm", "resolution", "ema_decay"]
            names += ["layer_decay"] if self.unfreeze_stages != 1 else []
        if self.frozen_part_cacheable:
            names.append("frozen_cache_views")
        if self.trains_epochs or (self.probes and self.feature_views):
            names += ["scale_min", "hflip", "color_jitter"]
        return tuple(f.name for f in fields(self) if f.name in names)


def _validate(r: Recipe) -> None:
    def need(ok: bool, field: str, rule: str) -> None:
        if not ok:
            raise RecipeError(f"recipe {r.name!r}: {field}={getattr(r, field)!r} is invalid: {rule}")

    for f in fields(r):  # types first, so that a TOML typo ("1e-3" as a string) names its field
        value = getattr(r, f.name)
        expected = {"int": int, "float": (int, float), "bool": bool, "str": str}[f.type]
        bad_bool = isinstance(value, bool) and f.type != "bool"
        need(isinstance(value, expected) and not bad_bool, f.name, f"must be of type {f.type}")
    need(r.epochs >= 1, "epochs", "must be at least 1")
    need(r.max_train_images >= 0, "max_train_images", "0 (no cap) or a number of images")
    need(r.batch_size >= 1, "batch_size", "must be at least 1")
    need(0 <= r.freeze_epochs <= r.epochs, "freeze_epochs", "must be between 0 and epochs")
    need(r.unfreeze_stages >= -1, "unfreeze_stages", "-1 (all), 0 (none) or a number of top stages")
    need(r.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}")
    need(r.head in HEADS, "head", f"one of {HEADS}")
    need(r.head_stages >= 1, "head_stages", "must be at least 1")
    for name in ("lr", "backbone_lr_scale", "layer_decay"):
        need(math.isfinite(getattr(r, name)) and getattr(r, name) > 0, name, "must be a positive number")
    need(r.lr <= 1.0, "lr", "learning rates above 1 diverge; useful rates are 1e-5 .. 1e-2")
    need(r.backbone_lr_scale <= 1.0, "backbone_lr_scale", "pretrained layers train at most at the head's rate")
    need(r.layer_decay <= 1.0, "layer_decay", "must be in (0, 1]")
    need(r.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(0 <= r.momentum < 1, "momentum", "must be in [0, 1)")
    need(r.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
    need(0 <= r.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
    need(0 <= r.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
    need(0 <= r.head_dropout < 1, "head_dropout", "must be in [0, 1)")
    need(0 <= r.drop_path < 1, "drop_path", "must be in [0, 1)")
    need(0 < r.scale_min <= 1, "scale_min", "must be in (0, 1]")
    need(0 <= r.hflip <= 1, "hflip", "a probability in [0, 1]")
    need(r.color_jitter >= 0, "color_jitter", "must be >= 0")
    need(r.early_stopping >= 0, "early_stopping", "patience in epochs, 0 = off")
    need(r.resolution == 0 or 32 <= r.resolution <= 1024, "resolution",
         "0 (from the images' size) or a side in pixels, 32 to 1024")
    need(math.isfinite(r.probe_weight_decay) and r.probe_weight_decay >= 0, "probe_weight_decay",
         "0 (chosen on validation) or a weight decay such as 0.1")
    need(r.feature_views >= 0, "feature_views", "must be >= 0 (each view costs one pass over the training set)")
    need(r.frozen_cache_views >= 0, "frozen_cache_views",
         "0 (off) or the number of augmented views of each training image to cache")
    need(r.balance in BALANCE, "balance", f"one of {BALANCE}")
    need(r.crop in CROPS, "crop", f"one of {CROPS}")
    need(r.divergence_factor == 0 or r.divergence_factor > 1, "divergence_factor",
         "0 (off) or a factor above 1, such as 3")
    need(r.gradient_clip >= 0, "gradient_clip", "0 (off) or a maximum gradient norm, such as 1.0")
    need(not r.ensemble or not r.trains_backbone, "ensemble",
         "an ensemble combines frozen backbones; use a recipe that keeps the backbone frozen "
         "(--recipe small-similar or small-different) or drop the ensemble")
    need(all(r.ensemble_members), "ensemble", "backbone names separated by commas, e.g. mobilenetv2_100")
    need(0 <= r.ema_decay < 1, "ema_decay", "0 (off) or a decay in (0, 1), such as 0.9998")


def _parse(key: str, type_name: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        if type_name == "bool":
            lowered = value.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return lowered in ("true", "1", "yes")
        if type_name == "int":
            return int(value)
        if type_name == "float":
            return float(value)
    except ValueError:
        raise RecipeError(f"recipe field {key}: cannot read {value!r} as {type_name}") from None
    return value


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def _builtin_dir() -> Path:
    installed = Path(__file__).parent / "_recipes"  # inside a wheel
    return installed if installed.is_dir() else Path(__file__).resolve().parents[1] / "recipes"


def load(path: str | Path) -> Recipe:
    """Read a recipe TOML file; unknown keys and bad values are errors that name the file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"recipe file {path} does not exist; built-in recipes: {', '.join(names())}") from None
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"recipe file {path} is not valid TOML: {e}") from None
    data.setdefault("name", path.stem)
    known = {f.name for f in fields(Recipe)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RecipeError(f"recipe file {path}: unknown keys {unknown}; known keys: {', '.join(sorted(known))}")
    try:
        return Recipe(**data)
    except RecipeError as e:
        raise RecipeError(f"recipe file {path}: {e}") from None


def names() -> list[str]:
    return sorted(p.stem for p in _builtin_dir().glob("*.toml"))


def get(name_or_path: str | Path) -> Recipe:
    """A built-in recipe by name, or a recipe file by path."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or candidate.exists():
        return load(candidate)
    path = _builtin_dir() / f"{name_or_path}.toml"
    if not path.is_file():
        raise RecipeError(f"unknown recipe {str(name_or_path)!r}; built-in recipes: {', '.join(names())}, "
                          "or pass the path of a .toml recipe file")
    return load(path)



def choose(images_per_class: float, domain: str = "similar", domain_reason: str | None = None) -> tuple[str, str]:
    """Pick one of the four cases by data size and domain; returns (recipe name, one-line reason).

    ``domain_reason`` says how the domain was decided (a measurement); without it the domain is as given.
    """
    if domain not in ("similar", "different"):
        raise RecipeError(f"domain must be 'similar' or 'different', got {domain!r}")
    size = "small" if images_per_class < SMALL_DATA_IMAGES_PER_CLASS else "large"
    relation = "<" if size == "small" else ">="
    reason = (
        f"{images_per_class:.0f} training images per class {relation} {SMALL_DATA_IMAGES_PER_CLASS} -> {size} data; "
        + (domain_reason or f"domain {domain!r} as given")
    )
    return f"{size}-{domain}", reason

"""Which of the four recipes a data set needs: its size (images per class) and its distance from ImageNet.

Both are measured before any training: the size from the split, the domain gap from one forward pass of the
pretrained backbone over a sample of training images (model/domain.py). ``finetune inspect`` prints the
same measurements that ``fit --recipe auto`` acts on.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch.utils.data import DataLoader

from . import recipes
from .data import (
    DatasetSplits,
    ImageFolderDataset,
    build_transforms,
    collate_skipping,
    default_num_workers,
)
from .data.splits import load_splits
from .device import Device, resolve_device
from .model.backbones import create_backbone
from .model.domain import DomainGap, measure_domain_gap
from .model.frozen_forward import choose_backend, loader_workers
from .progress import Phases
from .recipes import Recipe
from .runtime import Precision, choose_precision

DOMAINS = ("auto", "similar", "different")
# One forward pass over this many training images (all classes) measures the gap: as decisive as 256 at about
# half the cost (docs/benchmarks.md, "Domain gap").
DOMAIN_SAMPLE_IMAGES = 128


def measure_domain(backbone: torch.nn.Module, splits: DatasetSplits, data_config: dict, precision: Precision,
                   *, num_workers: int | None = None, seed: int = 0, backend: str = "auto",
                   phases: Phases | None = None, device: Device | None = None) -> DomainGap | None:
    """Domain gap on a seeded random sample of training images, eval transform; None for a backbone without
    BatchNorm statistics (most vision transformers), where there is nothing to compare against."""
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in backbone.modules()):
        return None
    sample = random.Random(seed).sample(splits.train, min(DOMAIN_SAMPLE_IMAGES, len(splits.train)))
    dataset = ImageFolderDataset(sample, build_transforms(data_config, False))
    device = device or resolve_device()
    engine = choose_backend(backend, device.kind).name
    workers = loader_workers(engine, default_num_workers() if num_workers is None else num_workers)
    loader = DataLoader(dataset, batch_size=64, num_workers=workers, collate_fn=collate_skipping)
    with (phases or Phases(enabled=False)).run(f"domain gap on {len(sample)} training images", len(sample)) as step:
        return measure_domain_gap(backbone, loader, max_images=DOMAIN_SAMPLE_IMAGES, device=device,
                                  bf16=precision.lightning == "bf16-mixed", backend=engine, on_batch=step)


def domain_sentence(gap: DomainGap | None, model: str, pretrained: bool) -> tuple[str, str]:
    """(domain, how it was decided) from a measurement."""
    if not pretrained:
        return "similar", "domain not measured (no pretrained weights), assumed 'similar'"
    if gap is None:
        return "similar", f"domain not measured ({model} has no BatchNorm statistics), assumed 'similar'"
    relation = ">" if gap.domain == "different" else "<="
    return gap.domain, (f"domain gap {gap.score:.3f} {relation} {gap.threshold} (BatchNorm statistics of {model} "
                        f"on {gap.images} training images) -> {gap.domain}")


def resolve_recipe(
    recipe: str | Path | Recipe,
    images_per_class: float,
    domain: str = "similar",
    overrides: Mapping[str, Any] | None = None,
    domain_reason: str | None = None,
) -> tuple[Recipe, str]:
    """The recipe to run and why: ``"auto"`` picks one of the four cases by data size and domain."""
    if isinstance(recipe, Recipe):
        chosen, reason = recipe, "given as a Recipe object"
    elif str(recipe) == "auto":
        name, reason = recipes.choose(images_per_class, domain, domain_reason)
        chosen = recipes.get(name)
    else:
        chosen, reason = recipes.get(recipe), "chosen by the user"
    if overrides:
        chosen = chosen.override(overrides)
        reason += "; overrides: " + ", ".join(f"{k}={v}" for k, v in overrides.items())
    return chosen, reason


def base_recipe(recipe: str | Path | Recipe, overrides: Mapping[str, Any]) -> Recipe:
    """The backbone settings (model, pretrained) in force before the recipe itself is chosen."""
    base = recipe if isinstance(recipe, Recipe) else (
        Recipe(name="auto") if str(recipe) == "auto" else recipes.get(recipe))
    return base.override({k: v for k, v in overrides.items() if k in ("model", "pretrained")})


@dataclass(frozen=True)
class Inspection:
    data_dir: str
    classes: list[str]
    train_images: int
    val_images: int
    test_images: int
    images_per_class: float
    model: str
    domain_gap: DomainGap | None
    recipe: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        gap = self.domain_gap
        return {
            "data_dir": self.data_dir, "classes": self.classes, "train_images": self.train_images,
            "val_images": self.val_images, "test_images": self.test_images,
            "images_per_class": self.images_per_class,
            "small_data_threshold": recipes.SMALL_DATA_IMAGES_PER_CLASS, "model": self.model,
            "domain_gap": None if gap is None else {"score": gap.score, "threshold": gap.threshold,
                                                    "domain": gap.domain, "images": gap.images},
            "recipe": self.recipe, "reason": self.reason,
        }


def inspect_dataset(data_dir: str | Path, *, model: str | None = None, labels: str | Path | None = None,
                    val_fraction: float = 0.2, seed: int = 0, precision: str = "auto",
                    num_workers: int | None = None, feature_backend: str = "auto") -> Inspection:
    """The measurements behind ``--recipe auto``, without training."""
    data_dir = Path(data_dir)
    splits = load_splits(data_dir, labels=labels, val_fraction=val_fraction, seed=seed)
    base = base_recipe("auto", {"model": model} if model else {})
    backbone = create_backbone(base.model, pretrained=True, num_classes=len(splits.classes))
    data_config = timm.data.resolve_model_data_config(backbone)
    gap = measure_domain(backbone, splits, data_config, choose_precision(precision), num_workers=num_workers,
                         seed=seed, backend=feature_backend)
    domain, domain_reason = domain_sentence(gap, base.model, True)
    per_class = len(splits.train) / len(splits.classes)
    chosen, reason = resolve_recipe("auto", per_class, domain, None, domain_reason)
    return Inspection(str(data_dir), list(splits.classes), len(splits.train), len(splits.val), len(splits.test),
                      per_class, base.model, gap, chosen.name, reason)

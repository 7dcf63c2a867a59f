"""`finetune check`: the sanity checks of ../shared/METHOD.md ("babysitting"), run before a real fit, in about a
minute on the default backbone. Each check passes or fails with what it measured and, when it fails, the
likely causes.

1. ``first_loss``: the fresh head's loss on a batch is about ln(C) (C classes). Far above: the head starts with
   large weights (or confident wrong logits); far below: the task is easier than C classes (duplicates across
   classes, fewer real classes).
2. ``overfit``: ``OVERFIT_IMAGES`` training images (no augmentation, no regularisation) are driven to near-zero
   loss within ``OVERFIT_STEPS`` full-batch steps, through the parts the recipe trains, at the recipe's
   learning rate. A loss that rises or turns NaN means the learning rate is too high; one that does not move,
   that nothing trains or the rate is too low.
3. ``gradient_flow``: one backward pass gives every trainable group non-zero, finite gradients, and the frozen
   groups none.
4. ``label_signal``: a probe (model/probe.py) on frozen features of a sample of training images scores the
   validation sample clearly above chance (``SIGNAL_SE`` standard errors). Labels shuffled at random still pass
   check 2 (a network memorises anything) but fail here.
5. ``augmentations``: a grid of augmented training images, as the model sees them, is saved for a person to
   look at.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F

from .data import DatasetSplits, scan_image_folder
from .data.images import load_rgb
from .data.transforms import build_transforms
from .model.backbones import create_backbone
from .model.classifier import Classifier
from .model.probe import CachedFeatures, feature_pass, fit_linear_probe
from .plots import figure, save_figure
from .recipes import Recipe
from .resolution import choose_resolution

FIRST_LOSS_TOLERANCE = 0.5  # |first loss - ln C| <= this x ln C passes
OVERFIT_IMAGES = 16
OVERFIT_STEPS = 60
OVERFIT_TARGET = 0.1  # x ln C: "near zero"
SIGNAL_PER_CLASS = 25  # training and validation images per class for the label-signal probe
SIGNAL_SE = 3.0
GRID = 16


@dataclass
class CheckResult:
    name: str
    passed: bool
    measured: str
    diagnosis: str = ""  # the likely causes when it failed; what to look at otherwise


def run_checks(data_dir: str | Path, recipe: Recipe, *, out: str | Path, seed: int = 0,
               splits: DatasetSplits | None = None) -> list[CheckResult]:
    """The five checks for ``recipe`` on the image folder ``data_dir``; files (the augmentation grid) go to
    ``out``."""
    torch.manual_seed(seed)
    splits = splits or scan_image_folder(data_dir, seed=seed)
    num_classes = len(splits.classes)
    backbone = create_backbone(recipe.model, pretrained=recipe.pretrained, num_classes=num_classes)
    data_config = timm.data.resolve_model_data_config(backbone)
    data_config = choose_resolution(recipe, splits, data_config["input_size"][-1], seed).data_config(data_config)
    classifier = Classifier(backbone, num_classes, head=recipe.head, head_stages=recipe.head_stages)
    classifier.start_head_near_zero(seed)  # as fit starts it
    unfrozen = recipe.unfreeze_stages if recipe.trains_backbone else 0
    rng = random.Random(seed)
    tiny = _balanced(splits.train, OVERFIT_IMAGES, rng)
    images, labels = _batch(tiny, data_config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    first = first_loss(classifier, images, labels, unfrozen)
    flow = gradient_flow(classifier, images, labels, unfrozen)
    signal = label_signal(classifier, splits, data_config, rng)  # before the overfit check changes the weights
    fitted = overfit(classifier, images, labels, unfrozen, recipe)
    return [first, fitted, flow, signal, augmentations(splits, data_config, recipe, out / "augmentations.png", rng)]


def _balanced(samples: list, n: int, rng: random.Random) -> list:
    by_class: dict[int, list] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    for group in by_class.values():
        rng.shuffle(group)
    picked, i = [], 0
    while len(picked) < min(n, len(samples)):
        for group in by_class.values():
            if i < len(group) and len(picked) < n:
                picked.append(group[i])
        i += 1
    return picked


def _batch(samples: list, data_config: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    transform = build_transforms(data_config, train=False)
    images = torch.stack([transform(image=load_rgb(s.path))["image"] for s in samples])
    return images, torch.tensor([s.label for s in samples])


def first_loss(classifier: Classifier, images: torch.Tensor, labels: torch.Tensor, unfrozen: int) -> CheckResult:
    expected = math.log(classifier.num_classes)
    classifier.set_trainable(unfrozen)
    classifier.train()  # the head's BatchNorm standardises with the batch, as in the first training step
    with torch.no_grad():
        loss = float(F.cross_entropy(classifier(images), labels))
    passed = abs(loss - expected) <= FIRST_LOSS_TOLERANCE * expected
    if passed:
        why = "the fresh head predicts about uniformly, as it should"
    elif loss > expected:
        why = ("the fresh head is confidently wrong: its initial weights are too large (a head should start near "
               "zero), or the labels do not match the images (label noise, a wrong class mapping)")
    else:
        why = (f"the fresh head is already confident: fewer than {classifier.num_classes} classes really differ, "
               "or the same images sit in several classes")
    return CheckResult("first_loss", passed, f"{loss:.3f} against ln({classifier.num_classes}) = {expected:.3f}",
                       why)


def gradient_flow(classifier: Classifier, images: torch.Tensor, labels: torch.Tensor, unfrozen: int) -> CheckResult:
    classifier.set_trainable(unfrozen)
    classifier.train()
    classifier.zero_grad(set_to_none=True)
    if any(p.requires_grad for p in classifier.parameters()):
        F.cross_entropy(classifier(images), labels).backward()
    named = dict(classifier.named_parameters())
    groups = {"head": classifier.head_parameter_names(),
              **{f"stage{i}": names for i, names in enumerate(classifier.stage_groups())}}
    dead, leaking, flowing = [], [], []
    for group, names in groups.items():
        params = [named[n] for n in names if n in named]
        trainable = [p for p in params if p.requires_grad]
        if not trainable:
            if any(p.grad is not None for p in params):
                leaking.append(group)
            continue
        norms = [p.grad.norm() if p.grad is not None else torch.tensor(0.0) for p in trainable]
        total = float(torch.stack(norms).norm())
        (flowing if math.isfinite(total) and total > 0 else dead).append(group)
    classifier.zero_grad(set_to_none=True)
    passed = bool(flowing) and not dead and not leaking
    if not flowing and not dead:
        why = "no parameter is trainable: everything is frozen, so training cannot change the model"
    elif dead:
        why = (f"trainable groups without a finite, non-zero gradient: {', '.join(dead)} (a detached or unused "
               "part of the network, or a NaN in the forward pass)")
    elif leaking:
        why = f"frozen groups that received gradients: {', '.join(leaking)}"
    else:
        why = "every trainable group gets a gradient and no frozen one does"
    return CheckResult("gradient_flow", passed, f"gradients in {', '.join(flowing) or 'no group'}", why)


def overfit(classifier: Classifier, images: torch.Tensor, labels: torch.Tensor, unfrozen: int,
            recipe: Recipe) -> CheckResult:
    """Full-batch steps of the recipe's optimiser at its ``lr``, without weight decay, dropout or augmentation;
    the backbone's frozen part runs once when only the head trains."""
    lr = recipe.lr
    classifier.set_trainable(unfrozen)
    params = [p for p in classifier.parameters() if p.requires_grad]
    target = OVERFIT_TARGET * math.log(classifier.num_classes)
    if not params:
        return CheckResult("overfit", False, "nothing trainable", "every parameter is frozen: nothing can learn")
    for module in classifier.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    features = None
    if not unfrozen:  # only the head trains: its input never changes
        classifier.eval()
        with torch.no_grad():
            features = classifier.head_features(images)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=recipe.momentum, nesterov=True) \
        if recipe.optimizer == "sgd" else torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(OVERFIT_STEPS):
        classifier.train()
        logits = classifier.head_logits(features) if features is not None else classifier(images)
        loss = F.cross_entropy(logits, labels)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]) or losses[-1] < target:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    first, last = losses[0], losses[-1]
    passed = math.isfinite(last) and last < target
    measured = f"loss {first:.3f} -> {last:.3g} in {len(losses)} steps on {len(labels)} images (target < {target:.3f})"
    if passed:
        why = "the trained parts can fit a tiny subset"
    elif not math.isfinite(last) or last > first:
        why = f"the loss rose or turned NaN: the learning rate ({lr:g}) is too high; divide it by 10"
    elif last > 0.8 * first:
        why = (f"the loss barely moved: the learning rate ({lr:g}) is too low, too little of the network "
               "trains, or the labels do not match the images")
    else:
        why = f"the loss fell but not to near zero in {OVERFIT_STEPS} steps: a higher learning rate, or more steps"
    return CheckResult("overfit", passed, measured, why)


def label_signal(classifier: Classifier, splits: DatasetSplits, data_config: dict[str, Any],
                 rng: random.Random) -> CheckResult:
    """A probe on frozen features: trained on up to SIGNAL_PER_CLASS training images per class, scored on as
    many validation images per class."""
    classes = len(splits.classes)
    train = _balanced(splits.train, SIGNAL_PER_CLASS * classes, rng)
    val = _balanced(splits.val, SIGNAL_PER_CLASS * classes, rng)
    classifier.set_trainable(0)
    runner = feature_pass(classifier, backend="onnx")
    cached = []
    for samples in (train, val):
        images, labels = _batch(samples, data_config)
        features = torch.cat([runner(images[i:i + 32])[0] for i in range(0, len(images), 32)])
        cached.append(CachedFeatures(features, labels, [], 0.0))
    result = fit_linear_probe(cached[0], cached[1], classes)
    z = (cached[1].features.float() - result.mean) / result.std
    accuracy = float(((z @ result.weight.T + result.bias).argmax(1) == cached[1].labels).float().mean())
    chance = 1 / classes
    bar = chance + SIGNAL_SE * math.sqrt(chance * (1 - chance) / len(val))
    passed = accuracy >= bar
    why = ("the labels carry signal the frozen features can read" if passed else
           "a probe on frozen features is no better than chance on validation: the labels may be shuffled or "
           "wrong, or the classes may not differ in the images")
    return CheckResult("label_signal", passed, f"probe val accuracy {accuracy:.3f} on {len(val)} images (chance "
                                               f"{chance:.3f}, pass >= {bar:.3f})", why)


def augmentations(splits: DatasetSplits, data_config: dict[str, Any], recipe: Recipe, path: Path,
                  rng: random.Random) -> CheckResult:
    augmented = recipe.trains_epochs or recipe.feature_views > 0  # else the model only sees the eval transform
    transform = build_transforms(data_config, train=augmented, scale_min=recipe.scale_min, hflip=recipe.hflip,
                                 color_jitter=recipe.color_jitter, seed=rng.randrange(2**31))
    samples = _balanced(splits.train, GRID, rng)
    mean, std = np.array(data_config["mean"]), np.array(data_config["std"])
    cols = 4
    rows = math.ceil(len(samples) / cols)
    fig = figure(2.2 * cols, 2.4 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, sample in zip(axes.flat, samples, strict=False):
        pixels = transform(image=load_rgb(sample.path))["image"].permute(1, 2, 0).numpy()
        ax.imshow(np.clip(pixels * std + mean, 0, 1))
        ax.set_title(splits.classes[sample.label], fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"training augmentation of {recipe.name}: scale_min {recipe.scale_min}, hflip {recipe.hflip}, "
                 f"color_jitter {recipe.color_jitter}" if augmented else
                 f"{recipe.name} trains on the images as they are (its probe has no augmented views)", fontsize=9)
    save_figure(fig, path)
    return CheckResult("augmentations", path.is_file(), f"{len(samples)} augmented images in {path}",
                       "look at it: the model sees these; the classes should still be recognisable")


def to_json(results: list[CheckResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]

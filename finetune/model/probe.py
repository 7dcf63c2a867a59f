"""Training the head on cached features: a frozen backbone's output never changes, so compute it once.

A linear head on fixed features is a convex problem small enough to solve full-batch with L-BFGS (no
learning rate, no epochs); the weight decay is picked by a small sweep on the validation split. On imbalanced
data every class weighs the same in the loss (inverse-frequency weights: a full-batch fit cannot resample),
and the weight decay is picked on balanced accuracy, so that the selection does not undo the weighting.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..device import CPU, Device
from .classifier import Classifier
from .frozen_forward import FrozenPass

log = logging.getLogger("finetune")

# Strong to weak, each fit warm-starting the next; the best values on standardised ImageNet features sit inside
# the range with room on both sides (probe.csv of a run shows the sweep).
WEIGHT_DECAYS = (1.0, 3e-1, 1e-1, 3e-2, 1e-2, 1e-3)
STANDARDISE_EPS = 1e-5  # BatchNorm's default eps, so the multi-stage head's BatchNorm reproduces it exactly


@dataclass
class CachedFeatures:
    features: torch.Tensor  # float32 [N, D]
    labels: torch.Tensor  # int64 [N]
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    backend: str = "torch"  # what computed them: "onnx" (onnxruntime) or "torch"


@dataclass(frozen=True)
class ProbeResult:
    weight: torch.Tensor  # [C, D] on standardised features
    bias: torch.Tensor  # [C]
    mean: torch.Tensor  # [D]
    std: torch.Tensor  # [D]
    weight_decay: float
    sweep: list[dict[str, float]]  # per weight decay: train/val accuracy, val balanced accuracy and loss
    seconds: float
    selected_on: str = "val_acc"  # the sweep's column the weight decay was chosen on


class HeadFeatures(nn.Module):
    """``classifier.head_features`` as a module, so that it can be traced."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.head_features(images)


def extract_features(
    classifier: Classifier,
    batches: Iterable,
    *,
    device: Device = CPU,
    bf16: bool = False,
    channels_last: bool = False,
    backend: str = "torch",
    runner: FrozenPass | None = None,
    mirror: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> CachedFeatures:
    """Run the frozen backbone once over ``batches`` of ``(images, labels, skipped)`` in eval mode.

    ``backend="onnx"`` runs it in onnxruntime (model/frozen_forward.py), ``"torch"`` in eager PyTorch on
    ``device`` with bf16 autocast when ``bf16``; ``runner`` (from ``feature_pass``) reuses one built
    earlier, for several passes. ``CachedFeatures.backend`` says which one ran. ``mirror`` computes the
    features of the mirror images instead; ``on_batch(n)`` is called after each batch of n images."""
    started = time.perf_counter()
    classifier.eval()
    if runner is None:
        runner = feature_pass(classifier, device=device, bf16=bf16, channels_last=channels_last, backend=backend)
    feats, labels, skipped = [], [], []
    for images, targets, bad in batches:
        skipped.extend(bad)
        if images.shape[0] == 0:
            continue
        feats.append(runner(images.flip(-1) if mirror else images)[0])
        labels.append(targets)
        if on_batch is not None:
            on_batch(images.shape[0])
    if not feats:
        raise RuntimeError("no image could be decoded; nothing to extract features from")
    return CachedFeatures(torch.cat(feats), torch.cat(labels), skipped, time.perf_counter() - started,
                          runner.backend or backend)


def feature_pass(classifier: Classifier, *, device: Device = CPU, bf16: bool = False,
                 channels_last: bool = False, backend: str = "torch") -> FrozenPass:
    """What computes ``classifier.head_features``, reusable over several ``extract_features`` passes."""
    return FrozenPass(HeadFeatures(classifier), backend=backend, device=device, bf16=bf16,
                      channels_last=channels_last)


def fit_linear_probe(
    train: CachedFeatures,
    val: CachedFeatures,
    num_classes: int,
    weight_decays: Iterable[float] = WEIGHT_DECAYS,
    max_iter: int = 100,
    class_weights: Sequence[float] | None = None,
) -> ProbeResult:
    """Multinomial logistic regression on standardised features, L-BFGS, weight decay chosen on ``val``.

    With ``class_weights`` (one per class) the loss weighs each class's images by it and the weight decay is
    chosen on balanced accuracy (the mean of per-class recalls) instead of accuracy."""
    started = time.perf_counter()
    device = train.features.device
    x, y = train.features.float(), train.labels.to(device)
    mean = x.mean(0)
    std = (x.var(0, unbiased=False) + STANDARDISE_EPS).sqrt()
    z = torch.sub(x, mean).div_(std)  # one copy of the features, not two (memory at 100,000s of images)
    zv, yv = (val.features.to(device).float() - mean) / std, val.labels.to(device)
    weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=z.dtype, device=device)
    key = "val_acc" if weights is None else "val_balanced_acc"
    weight = torch.zeros(num_classes, z.shape[1], device=device, requires_grad=True)
    bias = torch.zeros(num_classes, device=device, requires_grad=True)
    best, sweep = None, []
    for wd in weight_decays:
        _lbfgs(z, y, weight, bias, wd, max_iter, weights)
        with torch.no_grad():
            logits = zv @ weight.T + bias
            row = {"weight_decay": wd, "train_acc": ((z @ weight.T + bias).argmax(1) == y).float().mean().item(),
                   "val_acc": (logits.argmax(1) == yv).float().mean().item(),
                   "val_balanced_acc": balanced_accuracy(logits, yv, num_classes),
                   "val_loss": F.cross_entropy(logits, yv, weight=weights).item()}
        sweep.append(row)
        log.debug("probe weight_decay=%g: %s %.4f", wd, key, row[key])
        if best is None or (row[key], -row["val_loss"]) > (best[0][key], -best[0]["val_loss"]):
            best = (row, weight.detach().clone(), bias.detach().clone())
    row, w, b = best
    return ProbeResult(w, b, mean, std, row["weight_decay"], sweep, time.perf_counter() - started, key)


def balanced_accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """The mean over the classes present in ``labels`` of the share of their images predicted right."""
    predicted = logits.argmax(1)
    recalls = [(predicted[labels == c] == c).float().mean() for c in range(num_classes) if (labels == c).any()]
    return torch.stack(recalls).mean().item()


def _lbfgs(z: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, wd: float,
           max_iter: int, class_weights: torch.Tensor | None = None) -> None:
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-5, tolerance_change=1e-7, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, y, weight=class_weights) + 0.5 * wd * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)

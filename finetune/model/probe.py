"""Training the head on cached features: a frozen backbone's output never changes, so compute it once.

A linear head on fixed features is a convex problem small enough to solve full-batch with L-BFGS (no
learning rate, no epochs); the weight decay is picked by a small sweep on the validation split.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .classifier import Classifier
from .frozen_forward import FrozenPass

log = logging.getLogger("finetune")

# Strong to weak, each fit warm-starting the next. On standardised ImageNet features the best values sit around
# 1e-2 .. 3e-1 (Fashion-MNIST: 1e-1); the range extends a decade past both sides.
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
    sweep: list[dict[str, float]]  # per weight decay: train/val accuracy and loss
    seconds: float


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
    device: torch.device | str = "cpu",
    bf16: bool = False,
    channels_last: bool = False,
    backend: str = "torch",
    runner: FrozenPass | None = None,
) -> CachedFeatures:
    """Run the frozen backbone once over ``batches`` of ``(images, labels, skipped)`` in eval mode.

    ``backend="onnx"`` runs it in onnxruntime (model/frozen_forward.py), ``"torch"`` in eager PyTorch on
    ``device`` with bf16 autocast when ``bf16``; ``runner`` (from ``feature_pass``) reuses one built
    earlier, for several passes. ``CachedFeatures.backend`` says which one ran."""
    started = time.perf_counter()
    classifier.eval()
    if runner is None:
        runner = feature_pass(classifier, device=device, bf16=bf16, channels_last=channels_last, backend=backend)
    feats, labels, skipped = [], [], []
    for images, targets, bad in batches:
        skipped.extend(bad)
        if images.shape[0] == 0:
            continue
        feats.append(runner(images)[0])
        labels.append(targets)
    if not feats:
        raise RuntimeError("no image could be decoded; nothing to extract features from")
    return CachedFeatures(torch.cat(feats), torch.cat(labels), skipped, time.perf_counter() - started,
                          runner.backend or backend)


def feature_pass(classifier: Classifier, *, device: torch.device | str = "cpu", bf16: bool = False,
                 channels_last: bool = False, backend: str = "torch") -> FrozenPass:
    """What computes ``classifier.head_features``, reusable over several ``extract_features`` passes."""
    return FrozenPass(HeadFeatures(classifier), backend=backend, device=str(device), bf16=bf16,
                      channels_last=channels_last)


def fit_linear_probe(
    train: CachedFeatures,
    val: CachedFeatures,
    num_classes: int,
    weight_decays: Iterable[float] = WEIGHT_DECAYS,
    max_iter: int = 100,
) -> ProbeResult:
    """Multinomial logistic regression on standardised features, L-BFGS, weight decay chosen on ``val``."""
    started = time.perf_counter()
    x, y = train.features.float(), train.labels
    mean = x.mean(0)
    std = (x.var(0, unbiased=False) + STANDARDISE_EPS).sqrt()
    z = (x - mean) / std
    zv = (val.features.float() - mean) / std
    weight = torch.zeros(num_classes, z.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    best, sweep = None, []
    for wd in weight_decays:
        _lbfgs(z, y, weight, bias, wd, max_iter)
        with torch.no_grad():
            logits = zv @ weight.T + bias
            row = {
                "weight_decay": wd,
                "train_acc": ((z @ weight.T + bias).argmax(1) == y).float().mean().item(),
                "val_acc": (logits.argmax(1) == val.labels).float().mean().item(),
                "val_loss": F.cross_entropy(logits, val.labels).item(),
            }
        sweep.append(row)
        log.debug("probe weight_decay=%g: val acc %.4f", wd, row["val_acc"])
        if best is None or (row["val_acc"], -row["val_loss"]) > (best[0]["val_acc"], -best[0]["val_loss"]):
            best = (row, weight.detach().clone(), bias.detach().clone())
    row, w, b = best
    return ProbeResult(w, b, mean, std, row["weight_decay"], sweep,
                       time.perf_counter() - started)


def _lbfgs(z: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, wd: float,
           max_iter: int) -> None:
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-5, tolerance_change=1e-7, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, y) + 0.5 * wd * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)

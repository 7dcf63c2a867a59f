"""How far a data set is from the pretraining data, measured with the backbone alone.

Every BatchNorm layer of a pretrained network stores the mean and variance of its input over the
pretraining data (ImageNet) in its running statistics. Feeding target images through the network in eval
mode and comparing each layer's input statistics with those running statistics measures the gap layer by
layer, without any ImageNet image: the KL divergence between the per-channel Gaussians, averaged over
channels, then over layers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

# Calibrated on real data (scripts/reference_sets.py; numbers in the README): crops of the scikit-image and
# scikit-learn sample photographs score 0.05-0.09 on tf_efficientnet_lite0 and mobilenetv2_100, while
# Fashion-MNIST scores 0.35, MNIST 0.53-0.57 and sklearn digits 0.54-0.65. The threshold sits between the two
# groups, near their geometric middle, leaving a factor of about two on each side.
DOMAIN_GAP_THRESHOLD = 0.18


@dataclass(frozen=True)
class DomainGap:
    score: float  # mean over layers of the mean per-channel KL(target || pretraining)
    per_layer: list[float]
    images: int
    threshold: float = DOMAIN_GAP_THRESHOLD

    @property
    def domain(self) -> str:
        return "different" if self.score > self.threshold else "similar"


class _InputStats:
    """Accumulates per-channel sums of a BatchNorm layer's input."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: torch.Tensor | None = None
        self.sq: torch.Tensor | None = None

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach().float()
        dims = [d for d in range(x.ndim) if d != 1]
        count = x.numel() // x.shape[1]
        s, q = x.sum(dims).double(), x.pow(2).sum(dims).double()
        self.sum = s if self.sum is None else self.sum + s
        self.sq = q if self.sq is None else self.sq + q
        self.n += count


def _kl_to_running(stats: _InputStats, bn: nn.modules.batchnorm._BatchNorm) -> float:
    mean = stats.sum / stats.n
    var = (stats.sq / stats.n - mean**2).clamp_min(1e-8)
    ref_mean = bn.running_mean.double()
    ref_var = bn.running_var.double().clamp_min(1e-8)
    kl = 0.5 * (torch.log(ref_var / var) + (var + (mean - ref_mean) ** 2) / ref_var - 1)
    return float(kl.mean())


def measure_domain_gap(
    model: nn.Module,
    batches: Iterable,
    *,
    max_images: int = 256,
    device: torch.device | str = "cpu",
    bf16: bool = False,
) -> DomainGap:
    """Score ``batches`` of ``(images, labels, skipped)`` against ``model``'s BatchNorm running statistics.

    ``model`` must be pretrained and contain BatchNorm layers (most CNNs); raises ValueError otherwise.
    """
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    if not norms:
        raise ValueError(f"{type(model).__name__} has no BatchNorm running statistics to compare against")
    stats = [_InputStats() for _ in norms]
    hooks = [bn.register_forward_pre_hook(s) for bn, s in zip(norms, stats, strict=True)]
    was_training = model.training
    model.eval().to(device)
    seen = 0
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else nullcontext()
    try:
        with torch.inference_mode(), autocast:
            for images, *_ in batches:
                if images.shape[0] == 0:
                    continue
                images = images[: max_images - seen].to(device)
                model(images)
                seen += images.shape[0]
                if seen >= max_images:
                    break
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("no decodable image to measure the domain gap on")
    per_layer = [_kl_to_running(s, bn) for s, bn in zip(stats, norms, strict=True)]
    score = float(sum(per_layer) / len(per_layer))
    return DomainGap(score=score if math.isfinite(score) else float("inf"), per_layer=per_layer, images=seen)

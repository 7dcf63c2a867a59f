"""How far a data set is from the pretraining data, measured with the backbone alone.

Every BatchNorm layer of a pretrained network stores the mean and variance of its input over the
pretraining data (ImageNet) in its running statistics. Feeding target images through the network in eval
mode and comparing each layer's input statistics with those running statistics measures the gap layer by
layer, without any ImageNet image: the KL divergence between the per-channel Gaussians, averaged over
channels, then over layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..device import CPU, Device
from .frozen_forward import FrozenPass

# Calibrated on real data (scripts/reference_sets.py; numbers in the README): crops of the scikit-image and
# scikit-learn sample photographs score 0.05-0.09 on tf_efficientnet_lite0 and mobilenetv2_100, while
# Fashion-MNIST scores 0.36-0.38, MNIST 0.53-0.60 and sklearn digits 0.57-0.66 (128 images each). The threshold
# sits between the two groups, near their geometric middle, leaving a factor of about two on each side.
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


class _NormInputMoments(nn.Module):
    """Runs ``model`` and returns, for each of its BatchNorm layers, the per-channel mean and mean square of
    that layer's input over the batch (and the spatial positions): two tensors of all layers' channels, each
    [batch, channels], so that batches of any size add up exactly. Traceable, so it runs in onnxruntime too."""

    def __init__(self, model: nn.Module, norms: list[nn.modules.batchnorm._BatchNorm]) -> None:
        super().__init__()
        self.model = model
        self.norms = norms
        self._collected: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _record(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].float()
        if x.ndim == 4:  # global average pooling: onnxruntime runs it in its blocked layout, faster than a mean
            self._collected.append((F.adaptive_avg_pool2d(x, 1).flatten(1), F.adaptive_avg_pool2d(x * x, 1).flatten(1)))
            return
        x = x.flatten(2) if x.ndim > 2 else x.unsqueeze(2)  # [N, C, positions]
        self._collected.append((x.mean(2), (x * x).mean(2)))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._collected = []
        hooks = [bn.register_forward_pre_hook(self._record) for bn in self.norms]
        try:
            self.model(images)
        finally:
            for hook in hooks:
                hook.remove()
        means, squares = zip(*self._collected, strict=True)
        return torch.cat(means, dim=1), torch.cat(squares, dim=1)


def _kl_to_running(mean: torch.Tensor, square: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> float:
    var = (square - mean**2).clamp_min(1e-8)
    ref_mean = bn.running_mean.double()
    ref_var = bn.running_var.double().clamp_min(1e-8)
    kl = 0.5 * (torch.log(ref_var / var) + (var + (mean - ref_mean) ** 2) / ref_var - 1)
    return float(kl.mean())


def measure_domain_gap(
    model: nn.Module,
    batches: Iterable,
    *,
    max_images: int = 128,
    device: Device = CPU,
    bf16: bool = False,
    backend: str = "torch",
    on_batch: Callable[[int], None] | None = None,
) -> DomainGap:
    """Score ``batches`` of ``(images, labels, skipped)`` against ``model``'s BatchNorm running statistics.

    ``model`` must be pretrained and contain BatchNorm layers (most CNNs); raises ValueError otherwise.
    ``backend="onnx"`` runs the pass in onnxruntime (model/frozen_forward.py). ``on_batch(n)`` is called
    after each batch of n images.
    """
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    if not norms:
        raise ValueError(f"{type(model).__name__} has no BatchNorm running statistics to compare against")
    was_training = model.training
    forward = FrozenPass(_NormInputMoments(model, norms), backend=backend, device=device, bf16=bf16)
    seen, mean_sum, square_sum = 0, None, None
    try:
        for images, *_ in batches:
            if images.shape[0] == 0:
                continue
            images = images[: max_images - seen]
            means, squares = (o.double().sum(0) for o in forward(images))
            mean_sum = means if mean_sum is None else mean_sum + means
            square_sum = squares if square_sum is None else square_sum + squares
            seen += images.shape[0]
            if on_batch is not None:
                on_batch(images.shape[0])
            if seen >= max_images:
                break
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("no decodable image to measure the domain gap on")
    sizes = [bn.num_features for bn in norms]
    per_layer = [_kl_to_running(m, q, bn) for m, q, bn in zip(
        (mean_sum / seen).split(sizes), (square_sum / seen).split(sizes), norms, strict=True)]
    score = float(sum(per_layer) / len(per_layer))
    return DomainGap(score=score if math.isfinite(score) else float("inf"), per_layer=per_layer, images=seen)

"""Synchronised BatchNorm for runs on several processes, for timm models, on GPUs and on CPUs.

Two gaps in what Lightning and torch provide:

- Lightning's ``sync_batchnorm=True`` converts layers with ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``,
  which turns timm's ``BatchNormAct2d`` (BatchNorm fused with its activation) into a plain ``SyncBatchNorm``
  and silently drops the activation. On CUDA, ``SyncBatchNorm`` converts with timm's own function (to
  ``SyncBatchNormAct``).
- torch's ``SyncBatchNorm`` runs on CUDA only (DDP refuses it on CPU processes). On CPUs (gloo) the batch
  statistics are summed over ranks with a differentiable all-reduce, which carries gradients back
  to every rank: the layers keep their class's parameters and buffers and only compute differently while
  training (``_GlobalBatchNorm2d``, ``_GlobalBatchNormAct2d``).

When training ends both convert back, so that the model that is evaluated, saved and exported has the layers
it was built with.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as collectives
from pytorch_lightning.plugins.layer_sync import LayerSync
from timm.layers import BatchNormAct2d, SyncBatchNormAct, convert_sync_batchnorm
from torch import nn


class SyncBatchNorm(LayerSync):
    """Batch statistics over the global batch (every rank's images) while training; ``cuda``: the model
    trains on CUDA GPUs (torch's kernels), else on CPU processes."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def apply(self, model: nn.Module) -> nn.Module:
        if self.cuda:
            return convert_sync_batchnorm(model)
        for module in model.modules():
            module.__class__ = _GLOBAL.get(type(module), type(module))
        return model

    def revert(self, model: nn.Module) -> nn.Module:
        if self.cuda:
            return _plain(model)
        for module in model.modules():
            module.__class__ = _LOCAL.get(type(module), type(module))
        return model


def _global_batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``bn`` in training mode, with the mean and variance of the batches of every rank."""
    if not (bn.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return nn.BatchNorm2d.forward(bn, x)
    dims = (0, 2, 3)
    xf = x.float()
    count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float32, device=x.device)
    sums = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])
    # differentiable (what torch.distributed.nn's deprecated all_reduce points to): each rank's gradient flows
    # back through every rank's statistics
    sums = collectives.all_reduce(sums, "sum", dist.group.WORLD)
    channels = x.shape[1]
    n = sums[-1]
    mean = sums[:channels] / n
    var = (sums[channels:2 * channels] / n - mean * mean).clamp(min=0)  # biased, as BatchNorm normalises with
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype), momentum)
            unbiased = var.detach() * n / (n - 1).clamp(min=1)
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), momentum)
    shape = (1, channels, 1, 1)
    y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y.to(x.dtype)


class _GlobalBatchNorm2d(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _global_batch_norm(self, x)


class _GlobalBatchNormAct2d(BatchNormAct2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        return self.act(self.drop(_global_batch_norm(self, x)))


_GLOBAL = {nn.BatchNorm2d: _GlobalBatchNorm2d, BatchNormAct2d: _GlobalBatchNormAct2d}
_LOCAL = {v: k for k, v in _GLOBAL.items()}


def _plain(module: nn.Module) -> nn.Module:
    """torch's and timm's SyncBatchNorm layers back to the BatchNorm layers they were made from."""
    out = module
    if isinstance(module, (SyncBatchNormAct, nn.SyncBatchNorm)):
        if isinstance(module, SyncBatchNormAct):
            out = BatchNormAct2d(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats, apply_act=False)
            out.act, out.drop = module.act, module.drop
        else:
            out = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _plain(child))
    return out

"""Depthwise convolutions on tiny feature maps, with a backward pass that is fast on a CPU.

PyTorch's CPU backward of a depthwise convolution (``groups`` = channels) is very slow when the feature map is
not much larger than the kernel: at a training side of 64 px the top stages of ``tf_efficientnet_lite0`` run on
4 x 4 and 2 x 2 maps, where the backward of one 5 x 5 depthwise layer takes about 100 ms for a batch of 128
against 0.5 ms for its forward, and those few layers take about a third of a training step
(``scripts/bench_depthwise.py``, docs/benchmarks.md "Depthwise backward"). Both gradients have cheap exact forms
there: the input's is a transposed depthwise convolution, the weights' is k x k sums of products over shifted
windows of the input. ``small_map_backward`` swaps those layers to use them while a model trains on a CPU, on
maps of at most ``SMALL_MAP`` pixels (above it PyTorch's own kernel is the faster one, measured), and swaps
them back afterwards: nothing of it is saved, exported or seen in evaluation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

SMALL_MAP = 16  # pixels (h x w) of the input at or below which the replacement backward is faster


class _DepthwiseConv2d(torch.autograd.Function):
    """``F.conv2d(x, weight, bias, stride, padding, groups=channels)`` with the backward described above."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):  # noqa: ANN001, ANN205 (autograd signature)
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        return F.conv2d(x, weight, bias, stride, padding, 1, weight.shape[0])

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, weight = ctx.saved_tensors
        stride, padding = ctx.stride, ctx.padding
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # the transposed convolution's output_padding restores the input's size where the stride drops rows
            extra = tuple((x.shape[2 + d] + 2 * padding[d] - weight.shape[2 + d]) % stride[d] for d in (0, 1))
            grad_x = F.conv_transpose2d(grad, weight.to(grad.dtype), None, stride, padding, extra,
                                        weight.shape[0]).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(x, grad, weight.shape, stride, padding).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3)).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None


def weight_grad(x: torch.Tensor, grad: torch.Tensor, shape: torch.Size, stride: tuple[int, int],
                padding: tuple[int, int]) -> torch.Tensor:
    """The gradient of a depthwise convolution's weights (``shape`` = channels x 1 x kh x kw): for each kernel
    offset, the sum over the batch and the output positions of the output's gradient times the input window at
    that offset. Accumulated in float32 whatever the autocast dtype."""
    # channels last (N, H, W, C): the sums then run over the outer dimensions, whatever layout autograd hands
    # over (reducing a contiguous N, C, H, W gradient over its tiny H x W is about 7x slower, measured)
    grad = grad.float().permute(0, 2, 3, 1).contiguous()
    padded = F.pad(x.float(), (padding[1], padding[1], padding[0], padding[0])).permute(0, 2, 3, 1).contiguous()
    out_h, out_w = grad.shape[1:3]
    result = grad.new_empty(shape)
    for i in range(shape[2]):
        for j in range(shape[3]):
            window = padded[:, i:i + stride[0] * (out_h - 1) + 1:stride[0], j:j + stride[1] * (out_w - 1) + 1:stride[1]]
            result[:, 0, i, j] = (grad * window).sum((0, 1, 2))
    return result


class SmallMapDepthwiseConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` depthwise layer that uses ``_DepthwiseConv2d`` when it is trained on a CPU on a map of at
    most ``SMALL_MAP`` pixels, and PyTorch's own convolution otherwise (same forward, same parameters)."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (torch.is_grad_enabled() and input.device.type == "cpu"
                and input.shape[-2] * input.shape[-1] <= SMALL_MAP):
            return _DepthwiseConv2d.apply(input, weight, bias, self.stride, self.padding)
        return super()._conv_forward(input, weight, bias)


def _swappable(module: nn.Module) -> bool:
    """A plain zero-padded, undilated depthwise ``nn.Conv2d`` with numeric padding."""
    return (type(module) is nn.Conv2d and module.groups > 1 and module.groups == module.in_channels
            == module.out_channels and module.padding_mode == "zeros" and module.dilation == (1, 1)
            and isinstance(module.padding, tuple))


@contextmanager
def small_map_backward(model: nn.Module, cpu: bool = True) -> Iterator[int]:
    """While inside, the depthwise layers of ``model`` use the fast small-map backward (on a CPU only: ``cpu``
    False does nothing). Yields how many layers were swapped; they are swapped back on exit, even on error."""
    layers = [m for m in model.modules() if _swappable(m)] if cpu else []
    for layer in layers:
        layer.__class__ = SmallMapDepthwiseConv2d
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer.__class__ = nn.Conv2d

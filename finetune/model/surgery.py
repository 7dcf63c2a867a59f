"""Model surgery for export: swapping modules for equivalents that trace to simpler graphs."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class FixedPadConv(nn.Module):
    """timm's ``Conv2dSame`` (TensorFlow "same" padding, computed from the input's size at every call) with
    the padding of one known input size fixed, so that an exported graph holds constants instead of shape
    arithmetic. Shares the convolution's parameters."""

    def __init__(self, conv: nn.Conv2d, pads: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.conv = conv
        self.pads = pads  # left, right, top, bottom, as F.pad takes them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        return F.conv2d(F.pad(x, self.pads), c.weight, c.bias, c.stride, 0, c.dilation, c.groups)


def fix_same_padding(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """Replace every ``Conv2dSame`` of ``model`` (in place) by a ``FixedPadConv`` for the input size of
    ``example``. Only valid for that input size, which is what an export with a fixed image size needs."""
    from timm.layers.padding import get_same_padding

    for name, (h, w) in _same_conv_input_sizes(model, example).items():
        parent, _, attr = name.rpartition(".")
        conv = model.get_submodule(name)
        ph = get_same_padding(h, conv.kernel_size[0], conv.stride[0], conv.dilation[0])
        pw = get_same_padding(w, conv.kernel_size[1], conv.stride[1], conv.dilation[1])
        fixed = FixedPadConv(conv, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        setattr(model.get_submodule(parent) if parent else model, attr, fixed)
    return model


def _same_conv_input_sizes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, int]]:
    """The (H, W) each ``Conv2dSame`` of ``model`` sees when ``model`` runs on ``example``, by module name."""
    from timm.layers import Conv2dSame

    sizes: dict[str, tuple[int, int]] = {}

    def record(name: str) -> Callable:
        def hook(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            sizes.setdefault(name, tuple(args[0].shape[-2:]))
        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in model.named_modules()
             if isinstance(m, Conv2dSame)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return sizes

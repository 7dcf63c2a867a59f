"""The small-map depthwise backward gives PyTorch's gradients, is used only where it should be, and leaves the
model as it found it."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from finetune.model.depthwise import SMALL_MAP, SmallMapDepthwiseConv2d, _DepthwiseConv2d, small_map_backward


@pytest.mark.parametrize(("side", "kernel", "stride", "padding", "bias", "channels_last"), [
    (2, 5, 1, 2, False, True),   # the top stage of tf_efficientnet_lite0 at 64 px
    (4, 5, 1, 2, True, False),
    (3, 3, 1, 1, False, False),
    (4, 3, 2, 0, True, True),    # strided, unpadded (TF "same" pads outside the layer)
    (5, 3, 2, 1, False, False),  # a stride that drops a row: output_padding restores the input's size
])
def test_gradients_equal_pytorchs(side: int, kernel: int, stride: int, padding: int, bias: bool,
                                  channels_last: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 8, side, side)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(8, 1, kernel, kernel)
    b = torch.randn(8) if bias else None
    inputs = [t.clone().requires_grad_() for t in (x, weight)] + ([b.clone().requires_grad_()] if bias else [])
    ours = _DepthwiseConv2d.apply(inputs[0], inputs[1], inputs[2] if bias else None, (stride, stride),
                                  (padding, padding))
    reference_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    reference = F.conv2d(reference_inputs[0], reference_inputs[1], reference_inputs[2] if bias else None, stride,
                         padding, 1, 8)
    torch.testing.assert_close(ours, reference)
    grad = torch.randn_like(reference)
    for got, want in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(reference, reference_inputs,
                                                                                      grad), strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_used_only_on_small_maps_while_training() -> None:
    layer = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    with small_map_backward(layer):
        assert type(layer) is SmallMapDepthwiseConv2d
        calls = []
        original = _DepthwiseConv2d.apply
        _DepthwiseConv2d.apply = lambda *a: calls.append(a[0].shape) or original(*a)  # type: ignore[method-assign]
        try:
            side = int(SMALL_MAP ** 0.5)
            layer(torch.randn(2, 4, side, side))          # small map, gradients on: replaced
            layer(torch.randn(2, 4, side + 1, side + 1))  # larger map: PyTorch's
            with torch.no_grad():
                layer(torch.randn(2, 4, side, side))      # evaluation: PyTorch's
        finally:
            _DepthwiseConv2d.apply = original  # type: ignore[method-assign]
    assert calls == [torch.Size([2, 4, side, side])]
    assert type(layer) is nn.Conv2d


def test_model_gradients_unchanged_and_model_restored() -> None:
    """A timm EfficientNet at a side where its top stages run on tiny maps: one training step's loss and every
    gradient equal PyTorch's, only depthwise layers are swapped, and they are swapped back (even on error)."""
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3).train()
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    depthwise = [m for m in model.modules() if type(m) is nn.Conv2d and m.groups > 1]
    assert depthwise

    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        torch.manual_seed(1)  # drop-path draws
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    reference_loss, reference_grads = step()
    with small_map_backward(model) as swapped:
        assert swapped == len(depthwise)
        loss, grads = step()
    torch.testing.assert_close(loss, reference_loss)
    for got, want in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, SmallMapDepthwiseConv2d) for m in model.modules())

    with pytest.raises(RuntimeError, match="boom"), small_map_backward(model):
        raise RuntimeError("boom")
    assert not any(isinstance(m, SmallMapDepthwiseConv2d) for m in model.modules())
    with small_map_backward(model, cpu=False) as swapped:
        assert swapped == 0

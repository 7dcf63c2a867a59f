"""ONNX graphs: a trace keeps a fixed or a free batch axis, and the eager check catches shapes, drift and NaN."""

import numpy as np
import pytest
import torch
from torch import nn

from finetune.onnx_graph import check_against_eager, trace_onnx
from finetune.runtime import onnx_session


def test_trace_fixes_every_shape_unless_the_batch_is_dynamic():
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    example = torch.randn(2, 3, 8, 8)
    fixed = onnx_session(trace_onnx(module, example, "images", ["out"]))
    assert fixed.get_inputs()[0].shape == [2, 3, 8, 8]
    for optimize in (False, True):
        free = onnx_session(trace_onnx(module, example, "images", ["out"], dynamic_batch=True, optimize=optimize))
        x = torch.randn(5, 3, 8, 8).clamp(-1, 1)
        with torch.no_grad():
            want = module(x)
        check_against_eager(free.run(["out"], {"images": x.numpy()}), [want], atol=1e-5)


def test_check_against_eager():
    want = np.array([[1.0, -2.0]], dtype=np.float32)
    check_against_eager([want + 1e-4], [want], atol=2e-4)
    check_against_eager([want + 1e-3], [want], atol=0.0, rtol=1e-3)  # 1e-3 * max|want| = 2e-3
    with pytest.raises(ValueError, match="shape"):
        check_against_eager([want[0]], [want], atol=1.0)
    with pytest.raises(ValueError, match="differs .* on a batch of 1"):
        check_against_eager([want + 1e-2], [want], atol=1e-3, inputs="a batch of 1")
    with pytest.raises(ValueError, match="differs"):
        check_against_eager([want * np.nan], [want], atol=1.0)

"""A module traced to an ONNX graph, and the check that the graph computes what the eager module computes.

Both the exports (``export.py``) and the frozen one-off passes (``model/frozen_forward.py``) trace with torch's
TorchScript-based exporter on one example input: it is much quicker than the dynamo exporter, and a graph of
fixed shapes lets onnxruntime fold every shape computation. A trace can freeze what Python computed from the
example as a constant, so a traced graph is only used after ``check_against_eager`` passed on other inputs.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

TRACE_OPSET = 17


def trace_onnx(module: nn.Module, example: torch.Tensor, input_name: str, output_names: Sequence[str], *,
               opset: int = TRACE_OPSET, dynamic_batch: bool = False, optimize: bool = False) -> bytes:
    """``module`` traced on ``example`` by torch's TorchScript-based ONNX exporter: a serialised ONNX model.

    Every shape is fixed at ``example``'s unless ``dynamic_batch``, which leaves axis 0 of the input and of
    every output free. ``optimize`` folds the graph with onnxscript's optimizer."""
    buffer = io.BytesIO()
    axes = {name: {0: "batch"} for name in (input_name, *output_names)} if dynamic_batch else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        torch.onnx.export(module, (example,), buffer, dynamo=False, input_names=[input_name],
                          output_names=list(output_names), dynamic_axes=axes, opset_version=opset)
    if not optimize:
        return buffer.getvalue()
    import onnx
    import onnxscript.optimizer

    return onnxscript.optimizer.optimize(onnx.load_from_string(buffer.getvalue())).SerializeToString()


def check_against_eager(graph: Sequence[np.ndarray | torch.Tensor], eager: Sequence[np.ndarray | torch.Tensor], *,
                        atol: float, rtol: float = 0.0, inputs: str = "the check inputs") -> None:
    """Raise ``ValueError`` unless each graph output has the shape of the eager output and differs from it by
    at most ``atol + rtol * max|eager|`` (NaN never passes). ``inputs`` names the inputs in the message."""
    for got, want in zip(graph, eager, strict=True):
        got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
        if got.shape != want.shape:
            raise ValueError(f"the ONNX graph gives shape {got.shape}, eager {want.shape} on {inputs}")
        diff = float(np.abs(got - want).max(initial=0.0))
        if not diff <= atol + rtol * float(np.abs(want).max(initial=0.0)):
            raise ValueError(f"the ONNX graph differs from the eager module by {diff:.2e} on {inputs}")

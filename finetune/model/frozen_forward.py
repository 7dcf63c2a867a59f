"""Running a frozen network over a data set as fast as the hardware allows.

A frozen backbone is pure inference: eval mode, no gradient, the same weights for every batch. On a CPU,
onnxruntime runs that much faster than eager PyTorch (fused Conv+BatchNorm+activation, NCHWc blocked layouts):
measured on tf_efficientnet_lite0's multi-stage features on 2 cores of an AVX2 CPU in fp32, 85.5 against 14.3
images/s (``scripts/bench_train.py``, part ``frozen_forward``; ``bench/train-avx2.json``). So the one-off
passes of ``fit`` (the domain-gap measurement, the cached features of frozen phases) trace the module into an
in-memory ONNX graph with torch's TorchScript-based exporter (1-2 s; the dynamo exporter takes 17 s for the
same graph), run it in onnxruntime, and check it against the eager module; on any failure they fall back to
eager PyTorch with a warning. On a GPU, eager PyTorch (with autocast where chosen) is used.

The graph has a fixed batch size (``GRAPH_BATCH``); batches are cut into pieces of that size and the last
one is padded. Fixed shapes let onnxruntime fold every shape computation (TensorFlow-style "same" padding
computes its pads from the input shape) and lay the whole network out in NCHWc blocks: 1.8x the throughput
of the same graph with a dynamic batch axis.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from importlib.util import find_spec

import torch
from torch import nn

from ..errors import first_line
from ..runtime import onnx_session, usable_cpus

log = logging.getLogger("finetune")

BACKENDS = ("auto", "onnx", "torch")
# Trace and ONNX agree to float32 rounding on the check batch; a graph that drifts further is not used.
MAX_ABS_DIFF = 1e-3
MAX_REL_DIFF = 1e-3
GRAPH_BATCH = 8  # images per graph run; 4-8 were fastest on lite0 (110 and 102 img/s; 1: 92, 16: 87, 32: 108)

Forward = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class Backend:
    name: str  # "onnx" or "torch"
    reason: str


def choose_backend(requested: str = "auto", device: str = "cpu") -> Backend:
    """``auto``: onnxruntime on the CPU when it is installed, eager PyTorch on a GPU."""
    if requested not in BACKENDS:
        raise ValueError(f"feature backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "torch":
        return Backend("torch", "torch requested")
    if torch.device(device).type != "cpu":
        if requested == "onnx":
            raise ValueError(f"the onnx feature backend runs on the CPU only; the model is on {device}")
        return Backend("torch", f"eager PyTorch on {device}")
    if find_spec("onnxruntime") is None:
        if requested == "onnx":
            raise ValueError("the onnx feature backend needs onnxruntime: pip install onnxruntime")
        return Backend("torch", "eager PyTorch (onnxruntime is not installed)")
    return Backend("onnx", "onnx requested" if requested == "onnx" else "onnxruntime on the CPU")


def loader_workers(backend: str, default: int) -> int:
    """Loader processes to feed a frozen pass. onnxruntime computes on every core; on 2 cores or fewer a
    loader process competing with it for them cost more than decoding in the main process between graph
    runs (lite0 on Fashion-MNIST, 2 cores: 75 against 96 images/s)."""
    return 0 if backend == "onnx" and usable_cpus() <= 2 else default


def frozen_forward(module: nn.Module, example: torch.Tensor, *, backend: str = "torch", device: str = "cpu",
                   bf16: bool = False, channels_last: bool = False) -> tuple[Forward, str]:
    """A function running ``module`` (eval mode, no gradient) on batches; ``module`` returns a tensor or a tuple
    of tensors, the function always a tuple of float32 CPU tensors. Also returns the backend actually used.

    ``example`` is a batch like the ones to come; with ``backend="onnx"`` ``GRAPH_BATCH`` of its images are
    traced, and the graph is checked against eager on other inputs (those images mirrored, in another order),
    so that anything the trace froze as a constant shows up as a difference."""
    module.eval()
    if backend == "onnx":
        try:
            return _onnx_forward(module, example.cpu()), "onnx"
        except Exception as exc:  # noqa: BLE001 - any export or runtime failure: eager PyTorch is always right
            log.warning("onnxruntime could not run %s (%s: %s); running it in eager PyTorch", type(module).__name__,
                        type(exc).__name__, first_line(exc))
    return _torch_forward(module, device, bf16, channels_last), "torch"


class FrozenPass:
    """``module`` run by one backend over many batches and passes. Built on the first batch it sees (so that an
    ONNX graph is traced and checked on real images), then reused: one trace for the training, validation
    and test passes instead of one each. ``backend`` tells what ran (None before the first batch). The module
    must not change between passes: an ONNX graph holds a copy of the weights it was traced with."""

    def __init__(self, module: nn.Module, *, backend: str = "torch", device: str = "cpu", bf16: bool = False,
                 channels_last: bool = False) -> None:
        self.module = module
        self.requested = backend
        self.options = {"device": device, "bf16": bf16, "channels_last": channels_last}
        self.backend: str | None = None
        self._forward: Forward | None = None

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self._forward is None:
            self._forward, self.backend = frozen_forward(self.module, images, backend=self.requested, **self.options)
        return self._forward(images)


def _as_tuple(out: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


def _torch_forward(module: nn.Module, device: str, bf16: bool, channels_last: bool) -> Forward:
    module.to(device)
    autocast = (lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)) if bf16 else nullcontext

    def run(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        images = images.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast():
            return tuple(o.float().cpu() for o in _as_tuple(module(images)))

    return run


def _graph_batch(images: torch.Tensor) -> torch.Tensor:
    """Exactly ``GRAPH_BATCH`` images: the first ones, repeated when there are fewer."""
    reps = -(-GRAPH_BATCH // images.shape[0])
    return images.repeat(reps, *[1] * (images.ndim - 1))[:GRAPH_BATCH].float().contiguous()


def _onnx_forward(module: nn.Module, example: torch.Tensor) -> Forward:
    module.cpu()
    traced = _graph_batch(example)
    check = traced.flip(-1).roll(1, dims=0).contiguous()
    with torch.inference_mode():
        expected = [o.float() for o in _as_tuple(module(check))]
    outputs = [f"out{i}" for i in range(len(expected))]
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        torch.onnx.export(module, (traced,), buffer, dynamo=False, input_names=["images"], output_names=outputs,
                          opset_version=17)
    session = onnx_session(buffer.getvalue(), spinning=False)  # the cores decode the next batch meanwhile

    def run_graph(array) -> list:
        return session.run(outputs, {"images": array})

    def run(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        images = images.detach().cpu().float()
        pieces: list[list[torch.Tensor]] = [[] for _ in outputs]
        for start in range(0, images.shape[0], GRAPH_BATCH):
            piece = images[start:start + GRAPH_BATCH]
            n = piece.shape[0]
            if n < GRAPH_BATCH:  # pad: every image is computed independently in eval mode
                piece = torch.cat([piece, piece.new_zeros((GRAPH_BATCH - n, *piece.shape[1:]))])
            for i, out in enumerate(run_graph(piece.contiguous().numpy())):
                pieces[i].append(torch.from_numpy(out[:n]))
        return tuple(torch.cat(p) for p in pieces)

    for got, want in zip(run(check), expected, strict=True):
        if got.shape != want.shape:
            raise ValueError(f"the ONNX graph gives shape {tuple(got.shape)}, eager {tuple(want.shape)}")
        diff = (got - want).abs().max().item()
        if diff > MAX_ABS_DIFF + MAX_REL_DIFF * want.abs().max().item():
            raise ValueError(f"the ONNX graph differs from the eager module by {diff:.2e} on the check images")
    return run

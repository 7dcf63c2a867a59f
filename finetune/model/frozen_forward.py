"""Running a frozen network over a data set as fast as the hardware allows.

A frozen backbone is pure inference: eval mode, no gradient, the same weights for every batch. On a CPU,
onnxruntime runs that much faster than eager PyTorch (fused Conv+BatchNorm+activation, NCHWc blocked layouts;
``scripts/bench_train.py``, part ``frozen_forward``, measures it). So the one-off passes of ``fit`` (the
domain-gap measurement, the cached features of frozen phases) trace the module into an in-memory ONNX graph
(``onnx_graph.trace_onnx``: the TorchScript-based exporter, much quicker than the dynamo one), run it in
onnxruntime, and check it against the eager module; on any failure they fall back to eager PyTorch with a
warning. On a GPU, eager PyTorch (with autocast where chosen) is used.

The graph has a fixed batch size (``GRAPH_BATCH``); batches are cut into pieces of that size and the last
one is padded. Fixed shapes let onnxruntime fold every shape computation (TensorFlow-style "same" padding
computes its pads from the input shape) and lay the whole network out in NCHWc blocks, which runs faster
than the same graph with a dynamic batch axis.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from importlib.util import find_spec

import torch
from torch import nn

from ..device import CPU, Device
from ..errors import first_line
from ..onnx_graph import check_against_eager, trace_onnx
from ..runtime import onnx_session, usable_cpus

log = logging.getLogger("finetune")

ENGINE_CHOICES = ("auto", "onnx", "torch")  # what --feature-backend accepts
# Trace and ONNX agree to float32 rounding on the check batch; a graph that drifts further is not used.
MAX_ABS_DIFF = 1e-3
MAX_REL_DIFF = 1e-3
GRAPH_BATCH = 8  # images per graph run: the fastest of the sizes measured (docs/benchmarks.md)

Forward = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class FrozenEngine:
    """What runs the frozen passes, and why it was chosen."""

    name: str  # "onnx" (onnxruntime) or "torch" (eager PyTorch)
    reason: str


def choose_backend(requested: str = "auto", device: str = "cpu") -> FrozenEngine:
    """The engine of the frozen passes for ``--feature-backend``. ``auto``: onnxruntime on the CPU when it is
    installed, eager PyTorch on a GPU."""
    if requested not in ENGINE_CHOICES:
        raise ValueError(f"feature backend must be one of {ENGINE_CHOICES}, got {requested!r}")
    if requested == "torch":
        return FrozenEngine("torch", "torch requested")
    if torch.device(device).type != "cpu":
        if requested == "onnx":
            raise ValueError(f"the onnx feature backend runs on the CPU only; the model is on {device}")
        return FrozenEngine("torch", f"eager PyTorch on {device}")
    if find_spec("onnxruntime") is None:
        if requested == "onnx":
            raise ValueError("the onnx feature backend needs onnxruntime: pip install onnxruntime")
        return FrozenEngine("torch", "eager PyTorch (onnxruntime is not installed)")
    return FrozenEngine("onnx", "onnx requested" if requested == "onnx" else "onnxruntime on the CPU")


def loader_workers(backend: str, default: int) -> int:
    """Loader processes to feed a frozen pass. onnxruntime computes on every core; on 2 cores or fewer a
    loader process competing with it for them measured slower than decoding in the main process between
    graph runs (docs/benchmarks.md)."""
    return 0 if backend == "onnx" and usable_cpus() <= 2 else default


def frozen_forward(module: nn.Module, example: torch.Tensor, *, backend: str = "torch", device: Device = CPU,
                   bf16: bool = False, channels_last: bool = False) -> tuple[Forward, str]:
    """A function running ``module`` (eval mode, no gradient) on batches; ``module`` returns a tensor or a tuple
    of tensors, the function always a tuple of float32 CPU tensors. Also returns the backend actually used.
    Eager PyTorch runs on ``device`` (module and batches placed by it); onnxruntime on the CPU.

    ``example`` is a batch like the ones to come; with ``backend="onnx"`` ``GRAPH_BATCH`` of its images are
    traced, and the graph is checked against eager on other inputs (those images mirrored, in another order),
    so that anything the trace froze as a constant shows up as a difference."""
    module.eval()
    if backend == "onnx":
        try:
            return _onnx_forward(module, CPU.place(example)), "onnx"
        except Exception as exc:  # noqa: BLE001 - any export or runtime failure: eager PyTorch is always right
            log.warning("onnxruntime could not run %s (%s: %s); running it in eager PyTorch", type(module).__name__,
                        type(exc).__name__, first_line(exc))
    return _torch_forward(module, device, bf16, channels_last), "torch"


class FrozenPass:
    """``module`` run by one backend over many batches and passes. Built on the first batch it sees (so that an
    ONNX graph is traced and checked on real images), then reused: one trace for the training, validation
    and test passes instead of one each. ``backend`` tells what ran (None before the first batch), ``device``
    where eager PyTorch computes. The module must not change between passes: an ONNX graph holds a copy of the
    weights it was traced with."""

    def __init__(self, module: nn.Module, *, backend: str = "torch", device: Device = CPU, bf16: bool = False,
                 channels_last: bool = False) -> None:
        self.module = module
        self.requested = backend
        self.device = device
        self.options = {"bf16": bf16, "channels_last": channels_last}
        self.backend: str | None = None
        self._forward: Forward | None = None

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self._forward is None:
            self._forward, self.backend = frozen_forward(self.module, images, backend=self.requested,
                                                         device=self.device, **self.options)
        return self._forward(images)


def _as_tuple(out: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


def _torch_forward(module: nn.Module, device: Device, bf16: bool, channels_last: bool) -> Forward:
    autocast = (lambda: torch.autocast(device.kind, dtype=torch.bfloat16)) if bf16 else nullcontext

    def run(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        device.place(module)  # on every batch: Lightning's teardown moves a trained model back to the CPU
        images = device.place(images)
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
    CPU.place(module)
    traced = _graph_batch(example)
    check = traced.flip(-1).roll(1, dims=0).contiguous()
    with torch.inference_mode():
        expected = [o.float() for o in _as_tuple(module(check))]
    outputs = [f"out{i}" for i in range(len(expected))]
    graph = trace_onnx(module, traced, "images", outputs)
    session = onnx_session(graph, spinning=False)  # the cores decode the next batch meanwhile

    def run_graph(array) -> list:
        return session.run(outputs, {"images": array})

    def run(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        images = CPU.place(images.detach()).float()
        pieces: list[list[torch.Tensor]] = [[] for _ in outputs]
        for start in range(0, images.shape[0], GRAPH_BATCH):
            piece = images[start:start + GRAPH_BATCH]
            n = piece.shape[0]
            if n < GRAPH_BATCH:  # pad: every image is computed independently in eval mode
                piece = torch.cat([piece, piece.new_zeros((GRAPH_BATCH - n, *piece.shape[1:]))])
            for i, out in enumerate(run_graph(piece.contiguous().numpy())):
                pieces[i].append(torch.from_numpy(out[:n]))
        return tuple(torch.cat(p) for p in pieces)

    check_against_eager(run(check), expected, atol=MAX_ABS_DIFF, rtol=MAX_REL_DIFF, inputs="the check images")
    return run

"""Hardware-dependent choices: numeric precision, memory format, the CPU memory allocator, CPU threads and
onnxruntime sessions."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .device import Device, cpu_has_bf16, resolve_device  # noqa: F401 - cpu_has_bf16: the scripts' import
from .errors import UsageError

log = logging.getLogger("finetune")

PRECISIONS = ("auto", "bf16", "fp32", "16")


@dataclass(frozen=True)
class Precision:
    lightning: str  # the Trainer's precision argument
    channels_last: bool
    reason: str


def choose_precision(requested: str = "auto", device: Device | None = None) -> Precision:
    """bf16 autocast + channels_last where ``device`` (default: ``resolve_device()``) has bf16 (faster
    training, docs/benchmarks.md), fp32 otherwise; ``requested`` overrides. A CPU trains channels_last in fp32
    too: 1.4x faster steps at 224 px, 1.16x at 64 px with the small-map depthwise backward
    (``scripts/bench_depthwise.py``)."""
    if requested not in PRECISIONS:
        raise UsageError(f"--precision {requested}: choose from {', '.join(PRECISIONS)}")
    device = device or resolve_device()
    cuda, cpu = device.kind == "cuda", device.kind == "cpu"
    if requested == "fp32":
        return Precision("32-true", cpu, "fp32 requested" + (" (channels_last on a CPU)" if cpu else ""))
    if requested == "16":
        return Precision("16-mixed", cuda, "fp16 mixed precision requested")
    if requested == "bf16":
        return Precision("bf16-mixed", True, "bf16 requested")
    if cuda and device.bf16:
        return Precision("bf16-mixed", True, f"bf16 autocast: {device.name} supports bf16")
    if cuda:
        return Precision("16-mixed", True, "fp16 autocast: this GPU has no bf16")
    if cpu and device.bf16:
        return Precision("bf16-mixed", True, "bf16 autocast + channels_last: the CPU has native bf16")
    return Precision("32-true", cpu, "fp32" + (" + channels_last" if cpu else "") + ": the CPU has no native bf16")


M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


@functools.cache
def tune_allocator() -> bool:
    """Stop glibc from unmapping and remapping large activation buffers on every pass.

    glibc serves allocations over its mmap threshold with fresh mappings and returns them to the kernel when
    freed, so each forward/backward pays page faults on hundreds of MB (docs/benchmarks.md has the measured
    effect and its command). Same effect as the environment variables
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736, applied in-process. Numerics are unchanged.
    Returns True when applied (glibc only).
    """
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**36) == 1
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    return ok


def onnx_session(model: str | Path | bytes, threads: int | None = None, spinning: bool = True) -> Any:
    """An onnxruntime CPU session with every graph optimisation on and one intra-op thread per usable core.

    ``spinning=False`` stops idle intra-op threads from busy-waiting for work, which helps when other
    threads or processes need the same cores between graph runs (decoding the next batch, say)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or usable_cpus()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects container and taskset limits, unlike cpu_count
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1

"""Where a run computes. ``resolve_device`` is the one function that looks at the hardware (nothing else in
finetune calls ``torch.cuda``): every phase, loader and Lightning Trainer takes the ``Device`` it returns."""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from .errors import UsageError

ACCELERATORS = ("auto", "cpu", "gpu", "mps")

Placeable = TypeVar("Placeable", torch.Tensor, torch.nn.Module)


@dataclass(frozen=True)
class Device:
    kind: str  # torch's device type: "cpu", "cuda" or "mps"
    name: str  # for people: the GPU's name, or "CPU"
    bf16: bool  # computes bf16 natively (autocast is then faster than fp32, not slower)

    @property
    def torch(self) -> torch.device:
        return torch.device(self.kind)

    @property
    def accelerator(self) -> str:
        """Lightning's name for it."""
        return {"cuda": "gpu"}.get(self.kind, self.kind)

    @property
    def pin_memory(self) -> bool:
        """Pinned host memory speeds up copies to a CUDA device and does nothing for the others."""
        return self.kind == "cuda"

    def place(self, x: Placeable) -> Placeable:
        """``x`` on this device: every tensor and module that finetune computes with gets there through this.
        A module is moved in place (and returned); a tensor is copied without blocking where ``pin_memory``."""
        if isinstance(x, torch.nn.Module):
            return x.to(self.torch)
        return x.to(self.torch, non_blocking=self.pin_memory)

    def holds(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit in this accelerator's free memory, with room to compute on them (half of
        it); False for the CPU, where there is nothing to move."""
        if self.kind == "cuda":
            free, _ = torch.cuda.mem_get_info()
            return nbytes <= free / 2
        if self.kind == "mps":
            free = torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
            return nbytes <= free / 2
        return False

    @contextlib.contextmanager
    def exact(self) -> Iterator[None]:
        """fp32 computed as fp32 (no TF32 in CUDA convolutions and matrix products), for parity checks."""
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def resolve_device(accelerator: str = "auto") -> Device:
    """``auto``: a CUDA GPU when one is visible, else Apple's MPS, else the CPU. ``gpu``/``mps`` insist."""
    if accelerator not in ACCELERATORS:
        raise UsageError(f"--accelerator {accelerator}: choose from {', '.join(ACCELERATORS)}")
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if accelerator == "gpu" and not cuda:
        raise UsageError("--accelerator gpu: no CUDA GPU is visible to torch; use --accelerator auto or cpu")
    if accelerator == "mps" and not mps:
        raise UsageError("--accelerator mps: Apple's MPS is not available here; use --accelerator auto or cpu")
    if cuda and accelerator in ("auto", "gpu"):
        return Device("cuda", torch.cuda.get_device_name(), torch.cuda.is_bf16_supported())
    if mps and accelerator in ("auto", "mps"):
        return Device("mps", "Apple MPS", False)
    return CPU


def cpu_has_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX-512 BF16 or AMX); emulated bf16 is slower than fp32."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() == "arm64" and platform.system() == "Darwin"  # Apple M2+ have bf16
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


CPU = Device("cpu", "CPU", cpu_has_bf16())  # what resolve_device returns for the CPU; the default of placements


def rng_states() -> dict[str, Any]:
    """torch's random states (the CPU's, each CUDA device's: dropout and stochastic depth draw from them), for
    an exact resume. Augmentation and sampling do not use them (``data/sampling.py``)."""
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])

"""Whether a run folder can be written and will fit on its disk: checked before any training, so that a
run does not fail hours in on a full or read-only disk. A leaf module without torch: it takes counts.

What a run folder holds at its fullest, in float32 values of 4 bytes (measured in tests/test_output_space.py):

    checkpoints/   best.ckpt and last.ckpt: the weights, plus the optimiser's state when Lightning epochs run
                   (AdamW: two moments per trained parameter; SGD: one momentum buffer); while a checkpoint is
                   replaced its new copy is written beside the old one (Lightning, files.atomic_write)
    model.safetensors, and one copy of the weights per export format (export/model.safetensors, model.onnx,
                   model.pt2: ONNX folds batch norms, so it is at most one copy)
    cached features, when they are saved: images x views x feature dim
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .errors import UsageError
from .formats import parse_formats

FLOAT_BYTES = 4
OPTIMIZER_MOMENTS = {"adamw": 2, "sgd": 1}  # state tensors per trained parameter, each the parameter's size
# What the sum leaves out: torch.save's per-tensor records (about 250 bytes each), the pt2 graph, metrics.csv,
# TensorBoard events, plots and JSON files.
MARGIN_FRACTION = 0.10
MARGIN_BYTES = 64 * 1024**2


def run_bytes_needed(weights: int, trained: int = 0, *, optimizer: str | None = None, checkpoints: int = 2,
                     formats: Sequence[str] = (), cached_features: int = 0) -> int:
    """Bytes a run folder needs at its fullest, with a safety margin of 10 % plus 64 MiB.

    ``weights``: values in the model's state dict (parameters and buffers). ``trained``: parameters that
    get optimiser state under ``optimizer`` (``"adamw"``, ``"sgd"``; None when no Lightning epochs run and
    the checkpoints hold weights only). ``checkpoints``: checkpoint files kept. ``formats``: export formats
    (`formats.parse_formats` names). ``cached_features``: float32 values of cached features saved in the
    folder (images x views x feature dim).
    """
    moments = OPTIMIZER_MOMENTS[optimizer] if optimizer is not None else 0
    checkpoint = (weights + moments * trained) * FLOAT_BYTES
    copies = 1 + (len(parse_formats(formats)) if formats else 0)  # model.safetensors + one per export format
    total = (checkpoints + 1) * checkpoint + copies * weights * FLOAT_BYTES + cached_features * FLOAT_BYTES
    return int(total * (1 + MARGIN_FRACTION)) + MARGIN_BYTES


def check_output_space(location: str | Path, needed_bytes: int) -> None:
    """Raise `UsageError` unless the folder ``location`` (which may not exist yet) can be created and
    written, and its disk has ``needed_bytes`` free. The check is made in its nearest existing ancestor."""
    location = Path(location)
    ancestor = location.absolute()
    while not os.path.lexists(ancestor):
        ancestor = ancestor.parent
    where = f"output folder {location}"
    if not ancestor.is_dir():
        raise UsageError(f"{where}: {ancestor} is a file, not a folder; remove it or choose another --out")
    reason = _unwritable(ancestor)
    if reason:
        raise UsageError(f"{where}: cannot write in {ancestor} ({reason}); make it writable or choose another "
                         "--out")
    free = shutil.disk_usage(ancestor).free
    if free < needed_bytes:
        raise UsageError(f"{where}: the run needs {human_bytes(needed_bytes)}, {human_bytes(free)} free on "
                         f"{ancestor}; free some space or choose another --out on a larger disk")


def _unwritable(folder: Path) -> str | None:
    """Why no file can be created in ``folder`` (an existing folder), or None when one can."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return "permission denied"
    try:  # os.access does not see every refusal: a read-only mount for root, ACLs, quotas, network disks
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def human_bytes(n: int) -> str:
    """``n`` bytes in decimal units, three significant digits: ``"1.23 GB"``, ``"300 MB"``."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if value < 999.5 or unit == "PB":
            break
        value /= 1000
    if unit == "B":
        return f"{n} B"
    return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"

"""Predict with a run or an export: images in, labels with calibrated scores out.

``load(path)`` accepts a run folder, an export folder or a ``model.onnx`` file. On the CPU it runs the ONNX
export with onnxruntime when there is one (a run folder's ``export/model.onnx`` counts) and the safetensors
weights with torch otherwise; on an accelerator (``device.resolve_device``) it runs torch there. That choice
is the *backend*, and the object that runs the model is its *runner*. Both
runners get identical inputs: each image is decoded to RGB (``load_rgb``), resized and centre-cropped to the
model's input size exactly as validation did, and handed over as uint8 NCHW; the model normalises and
applies the calibration temperature itself (see ``finetune.export``). Scoring a labelled folder is
``finetune.evaluate``.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from . import formats, runs, serving
from .data import load_rgb, parse_data_config
from .data.paths import walk_images
from .device import CPU, Device, resolve_device
from .errors import ImageDecodeError, UsageError
from .runtime import onnx_session, tune_allocator, usable_cpus

log = logging.getLogger("finetune")

BACKENDS = ("auto", "onnx", "torch")
DEFAULT_BATCH_SIZE = 32
DEFAULT_TOP_K = 3


@dataclass(frozen=True)
class Prediction:
    """One input: the top label and its calibrated probability, the top-k, or why it could not be read."""

    source: str
    label: str | None = None
    score: float | None = None
    top_k: tuple[tuple[str, float], ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.source, "label": self.label, "score": self.score,
                "top_k": [{"label": label, "score": score} for label, score in self.top_k], "error": self.error}


class Runner(Protocol):
    """Runs the model of one backend; ``name`` says which (``onnxruntime``, ``torch``)."""

    name: str

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) uint8 -> (N, classes) calibrated probabilities."""


class OnnxRunner:
    def __init__(self, path: Path, threads: int | None = None) -> None:
        self.name = "onnx"  # the engine name used everywhere: --backend onnx, --feature-backend onnx
        self.path = path
        self.session = onnx_session(path, threads)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run([formats.OUTPUT_NAMES[1]], {formats.INPUT_NAME: pixels})[0]

    def config(self) -> dict[str, Any] | None:
        """The hub config that `finetune export` put into the model's metadata, if any."""
        text = self.session.get_modelmeta().custom_metadata_map.get("config")
        return json.loads(text) if text else None


class TorchRunner:
    """The model in PyTorch on ``device``: the model and every batch are placed there."""

    def __init__(self, model: torch.nn.Module, name: str = "torch", autocast: torch.dtype | None = None,
                 device: Device = CPU) -> None:
        self.name = name
        self.device = device
        self.model = device.place(model.eval())
        self.autocast = autocast
        tune_allocator()

    @torch.inference_mode()
    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        with torch.autocast(self.device.kind, dtype=self.autocast, enabled=self.autocast is not None):
            _, probabilities = self.model(self.device.place(torch.from_numpy(pixels)))
        return probabilities.float().cpu().numpy()


class Predictor:
    """A loaded model with its labels and preprocessing; ``predict`` takes paths or images."""

    def __init__(self, runner: Runner, config: dict[str, Any], source: Path) -> None:
        self.runner = runner
        self.config = config
        self.source = source
        self.labels: list[str] = list(config["label_names"])
        self.temperature = runs.temperature(config)
        self.data_config = parse_data_config(runs.data_config(config))

    def __repr__(self) -> str:
        return (f"Predictor({self.source}, {self.config['architecture']}, {len(self.labels)} classes, "
                f"backend={self.runner.name})")

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (3, h, w) uint8 at the model's input size (eval resize + centre crop)."""
        return serving.model_input(image, self.data_config)

    def probabilities(self, pixels: np.ndarray, tta: bool = False) -> np.ndarray:
        """Calibrated class probabilities for a (N, 3, h, w) uint8 batch; ``tta`` averages in the mirror image."""
        if not tta:
            return self.runner(pixels)
        both = self.runner(np.concatenate([pixels, np.ascontiguousarray(pixels[..., ::-1])]))
        return (both[: len(pixels)] + both[len(pixels) :]) / 2

    def predict(self, inputs: Any, *, top_k: int = DEFAULT_TOP_K, batch_size: int = DEFAULT_BATCH_SIZE,
                tta: bool = False) -> list[Prediction]:
        """Predictions for ``inputs``, in order: a path (file, folder searched recursively, or glob), an
        (H, W, 3) uint8 RGB array or a PIL image, or a list of those. Unreadable files give a Prediction
        whose ``error`` says why; they never stop the others."""
        return list(self.predict_iter(inputs, top_k=top_k, batch_size=batch_size, tta=tta))

    def predict_iter(self, inputs: Any, *, top_k: int = DEFAULT_TOP_K, batch_size: int = DEFAULT_BATCH_SIZE,
                     tta: bool = False) -> Iterator[Prediction]:
        """Like `predict`, but yields each batch's predictions as soon as it is computed. The arguments and
        the list of inputs are checked at once; files are read as the batches come."""
        _check_positive("batch_size", batch_size)
        _check_positive("top_k", top_k)
        return self._stream(_inputs(inputs), min(top_k, len(self.labels)), batch_size, tta)

    def _stream(self, items: list[_Input], k: int, batch_size: int, tta: bool) -> Iterator[Prediction]:
        for batch in self._decoded_batches(items, batch_size):
            good = [(source, pixels) for source, pixels, _ in batch if pixels is not None]
            probs = self.probabilities(np.stack([p for _, p in good]), tta) if good else np.empty((0, 0))
            rows = iter(probs)
            for source, pixels, error in batch:
                yield Prediction(source, error=error) if pixels is None else self._prediction(source, next(rows), k)

    def _prediction(self, source: str, probs: np.ndarray, k: int) -> Prediction:
        order = np.argsort(-probs, kind="stable")[:k]
        top = tuple((self.labels[i], float(probs[i])) for i in order)
        return Prediction(source, top[0][0], top[0][1], top)

    def _decoded_batches(self, items: list[_Input], batch_size: int) -> Iterator[list[_Decoded]]:
        """Decode batch i + 1 in threads while batch i is predicted (Pillow and onnxruntime release the GIL)."""
        chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
        with ThreadPoolExecutor(max_workers=usable_cpus()) as pool:
            pending: list[Future[_Decoded]] = [pool.submit(self._decode, item) for item in chunks[0]] if chunks else []
            for i in range(len(chunks)):
                current = pending
                pending = [pool.submit(self._decode, item) for item in chunks[i + 1]] if i + 1 < len(chunks) else []
                yield [f.result() for f in current]

    def _decode(self, item: _Input) -> _Decoded:
        source, value = item
        if isinstance(value, str):  # an error found while listing the inputs
            return source, None, value
        try:
            image = load_rgb(value) if isinstance(value, Path) else value
        except ImageDecodeError as exc:
            return source, None, exc.reason
        return source, self.preprocess(image), None


_Input = tuple[str, "Path | np.ndarray | str"]  # (shown name, file / RGB array / error message)
_Decoded = tuple[str, "np.ndarray | None", "str | None"]


def _inputs(inputs: Any) -> list[_Input]:
    if isinstance(inputs, (str, os.PathLike, np.ndarray)) or _is_pil(inputs):
        inputs = [inputs]
    items: list[_Input] = []
    for i, value in enumerate(inputs):
        if isinstance(value, (str, os.PathLike)):
            items.extend(find_images([value]))
        elif isinstance(value, np.ndarray) or _is_pil(value):
            items.append((f"<image {i}>", _rgb_array(value, i)))
        else:
            raise UsageError(f"input {i} is a {type(value).__name__}; predict takes paths, (H, W, 3) uint8 RGB "
                             "arrays or PIL images")
    return items


def _is_pil(value: Any) -> bool:
    from PIL import Image

    return isinstance(value, Image.Image)


def _rgb_array(value: Any, index: int) -> np.ndarray:
    array = np.asarray(value.convert("RGB")) if _is_pil(value) else value
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise UsageError(f"input {index} is an array of {array.dtype} {array.shape}; expected (H, W, 3) uint8 RGB "
                         "(decode files with finetune.data.load_rgb, or pass the path)")
    return np.ascontiguousarray(array)


def find_images(paths: Iterable[str | os.PathLike[str]]) -> list[tuple[str, Path | str]]:
    """Expand paths in order: a file as given (whatever its extension), a folder recursively (image
    extensions only, hidden files and `_quarantine` skipped, sorted), anything else as a glob. A path that
    matches nothing yields ``(path, error message)`` instead of a file."""
    found: list[tuple[str, Path | str]] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file():
            found.append((str(path), path))
        elif path.is_dir():
            found.extend((str(p), p) for p in _folder_images(path))
        else:
            matches = sorted(glob.glob(str(path), recursive=True))
            if not matches:
                found.append((str(raw), "no such file, folder or matching glob"))
            for match in matches:
                m = Path(match)
                found.extend([(match, m)] if m.is_file() else [(str(p), p) for p in _folder_images(m)])
    return found


def _folder_images(folder: Path) -> list[Path]:
    return list(walk_images(folder))  # sorted; hidden files and _quarantine passed over, as fit does


def _check_positive(name: str, value: int) -> None:
    if not (isinstance(value, int) and value >= 1):
        raise UsageError(f"{name} must be a positive integer, got {value!r}")


# --- loading ---------------------------------------------------------------------------------------------
def load(path: str | os.PathLike[str], backend: str = "auto", threads: int | None = None,
         accelerator: str = "auto") -> Predictor:
    """A Predictor for a run folder, an export folder or a ``.onnx`` file.

    ``accelerator`` (``auto``, ``cpu``, ``gpu``, ``mps``) is resolved by ``device.resolve_device``; torch
    runs there, onnxruntime on the CPU. ``backend="auto"`` uses onnxruntime on the CPU when an ONNX export is
    there (a run folder's ``export/model.onnx`` counts) and torch otherwise; ``"onnx"`` or ``"torch"``
    insist. Nothing executable is read from the files: ONNX graphs, safetensors weights, JSON configs (and
    ``weights_only`` for a ``.pt2``).
    """
    if backend not in BACKENDS:
        raise UsageError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    device = resolve_device(accelerator)
    path = Path(path)
    if path.is_file() and path.suffix == ".onnx":
        if backend == "torch":
            raise UsageError(f"{path} is an ONNX file; the torch backend needs a run or export folder")
        return _onnx_predictor(path, threads, device, accelerator)
    if not path.is_dir():
        raise UsageError(f"model {path} not found: give a run folder, an export folder or a .onnx file")
    if (path / runs.CONFIG_NAME).is_file():
        _read_config(path)  # the folder's format version, checked before any model file is read
    onnx_file = next((p for p in (path / formats.ONNX_NAME, path / formats.EXPORT_DIR / formats.ONNX_NAME)
                      if p.is_file()), None)
    if onnx_file is not None and (backend == "onnx" or (backend == "auto" and device.kind == "cpu")):
        return _onnx_predictor(onnx_file, threads, device, accelerator)
    if backend == "onnx":
        raise UsageError(f"no ONNX export in {path}: run `finetune export {path}` first, or use --backend torch")
    return _torch_predictor(path, threads, device)


def _onnx_predictor(path: Path, threads: int | None, device: Device, accelerator: str) -> Predictor:
    if device.kind != "cpu" and accelerator != "auto":
        raise UsageError(f"onnxruntime runs {path.name} on the CPU, not on --accelerator {accelerator}; use "
                         "--backend torch with a run or export folder, or --accelerator cpu")
    runner = OnnxRunner(path, threads)
    embedded = runner.config()
    config = runs.check_format(embedded, path) if embedded else _read_config(path.parent)
    return Predictor(runner, config, path)


def _torch_predictor(folder: Path, threads: int | None, device: Device) -> Predictor:
    if threads:
        torch.set_num_threads(threads)
    if (folder / runs.WEIGHTS_NAME).is_file():
        classifier, config = runs.load_model(folder)
        model = serving.ServingModel.from_config(classifier, config)
    elif (folder / formats.PT2_NAME).is_file():
        config = _read_config(folder)
        model = serving.load_pt2(folder / formats.PT2_NAME)
    else:
        raise UsageError(f"{folder} has no model ({runs.WEIGHTS_NAME}, {formats.ONNX_NAME} or {formats.PT2_NAME}): "
                         "give a run folder written by `finetune fit` or an export folder")
    return Predictor(TorchRunner(model, device=device), config, folder)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / runs.CONFIG_NAME
    try:
        return runs.check_format(json.loads(path.read_text()), path)
    except FileNotFoundError:
        raise UsageError(f"{path} not found: a model needs its config.json (labels, input size)") from None

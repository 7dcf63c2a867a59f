"""Predict with a run or an export: images in, labels with calibrated scores out; and evaluate a labelled folder.

``load(path)`` accepts a run folder, an export folder or a ``model.onnx`` file. It runs the ONNX export with
onnxruntime when there is one (a run folder's ``export/model.onnx`` counts) and the safetensors weights with
torch otherwise. Both backends get identical inputs: each image is decoded to RGB (``load_rgb``), resized
and centre-cropped to the model's input size exactly as validation did, and handed over as uint8 NCHW; the
model normalises and applies the calibration temperature itself (see ``finetune.export``).
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from . import export, runs
from .data import load_rgb, parse_data_config
from .data.paths import is_ignored, walk_images
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


class Backend(Protocol):
    name: str

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) uint8 -> (N, classes) calibrated probabilities."""


class OnnxBackend:
    def __init__(self, path: Path, threads: int | None = None) -> None:
        self.name = "onnxruntime"
        self.path = path
        self.session = onnx_session(path, threads)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run([export.OUTPUT_NAMES[1]], {export.INPUT_NAME: pixels})[0]

    def config(self) -> dict[str, Any] | None:
        """The hub config that `finetune export` put into the model's metadata, if any."""
        text = self.session.get_modelmeta().custom_metadata_map.get("config")
        return json.loads(text) if text else None


class TorchBackend:
    def __init__(self, model: torch.nn.Module, name: str = "torch", autocast: torch.dtype | None = None) -> None:
        self.name = name
        self.model = model.eval()
        self.autocast = autocast
        tune_allocator()

    @torch.inference_mode()
    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        with torch.autocast("cpu", dtype=self.autocast, enabled=self.autocast is not None):
            _, probabilities = self.model(torch.from_numpy(pixels))
        return probabilities.float().numpy()


class Predictor:
    """A loaded model with its labels and preprocessing; ``predict`` takes paths or images."""

    def __init__(self, backend: Backend, config: dict[str, Any], source: Path) -> None:
        self.backend = backend
        self.config = config
        self.source = source
        self.labels: list[str] = list(config["label_names"])
        self.temperature = runs.temperature(config)
        self.data_config = parse_data_config(runs.data_config(config))

    def __repr__(self) -> str:
        return (f"Predictor({self.source}, {self.config['architecture']}, {len(self.labels)} classes, "
                f"backend={self.backend.name})")

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (3, h, w) uint8 at the model's input size (eval resize + centre crop)."""
        return export.model_input(image, self.data_config)

    def probabilities(self, pixels: np.ndarray, tta: bool = False) -> np.ndarray:
        """Calibrated class probabilities for a (N, 3, h, w) uint8 batch; ``tta`` averages in the mirror image."""
        if not tta:
            return self.backend(pixels)
        both = self.backend(np.concatenate([pixels, np.ascontiguousarray(pixels[..., ::-1])]))
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
def load(path: str | os.PathLike[str], backend: str = "auto", threads: int | None = None) -> Predictor:
    """A Predictor for a run folder, an export folder or a ``.onnx`` file.

    ``backend="auto"`` uses onnxruntime when an ONNX export is there (a run folder's ``export/model.onnx``
    counts) and torch otherwise; ``"onnx"`` or ``"torch"`` insist. Nothing executable is read from the
    files: ONNX graphs, safetensors weights, JSON configs (and ``weights_only`` for a ``.pt2``).
    """
    if backend not in BACKENDS:
        raise UsageError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    path = Path(path)
    if path.is_file() and path.suffix == ".onnx":
        if backend == "torch":
            raise UsageError(f"{path} is an ONNX file; the torch backend needs a run or export folder")
        return _onnx_predictor(path, threads)
    if not path.is_dir():
        raise UsageError(f"model {path} not found: give a run folder, an export folder or a .onnx file")
    onnx_file = next((p for p in (path / export.ONNX_NAME, path / export.EXPORT_DIR / export.ONNX_NAME)
                      if p.is_file()), None)
    if backend in ("auto", "onnx") and onnx_file is not None:
        return _onnx_predictor(onnx_file, threads)
    if backend == "onnx":
        raise UsageError(f"no ONNX export in {path}: run `finetune export {path}` first, or use --backend torch")
    return _torch_predictor(path, threads)


def _onnx_predictor(path: Path, threads: int | None) -> Predictor:
    backend = OnnxBackend(path, threads)
    config = backend.config() or _read_config(path.parent)
    return Predictor(backend, config, path)


def _torch_predictor(folder: Path, threads: int | None) -> Predictor:
    if threads:
        torch.set_num_threads(threads)
    if (folder / runs.WEIGHTS_NAME).is_file():
        classifier, config = runs.load_model(folder)
        model = export.ServingModel.from_config(classifier, config)
    elif (folder / export.PT2_NAME).is_file():
        config = _read_config(folder)
        model = export.load_pt2(folder / export.PT2_NAME)
    else:
        raise UsageError(f"{folder} has no model ({runs.WEIGHTS_NAME}, {export.ONNX_NAME} or {export.PT2_NAME}): "
                         "give a run folder written by `finetune fit` or an export folder")
    return Predictor(TorchBackend(model), config, folder)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / runs.CONFIG_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path} not found: a model needs its config.json (labels, input size)") from None


# --- evaluate --------------------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """Scores of a model on a labelled folder. Macro averages leave out classes that neither occur in the
    folder nor are predicted (as torchmetrics does, so the numbers match the run's validation metrics)."""

    labels: list[str]
    confusion: np.ndarray  # rows: true class, columns: predicted class
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    predictions: list[tuple[str, str, str, float]] = field(default_factory=list, repr=False)  # path, true, pred, score
    files: dict[str, str] = field(default_factory=dict)

    @property
    def images(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.confusion) / max(1, self.images))

    def per_class(self) -> list[dict[str, Any]]:
        c = self.confusion
        rows = []
        for i, label in enumerate(self.labels):
            tp, support, predicted = c[i, i], c[i].sum(), c[:, i].sum()
            precision, recall = _ratio(tp, predicted), _ratio(tp, support)
            f1 = _ratio(2 * precision * recall, precision + recall)
            rows.append({"label": label, "precision": precision, "recall": recall, "f1": f1,
                         "support": int(support), "predicted": int(predicted)})
        return rows

    def _macro(self, key: str) -> float:
        used = [r[key] for r in self.per_class() if r["support"] or r["predicted"]]
        return float(np.mean(used)) if used else math.nan

    @property
    def macro_f1(self) -> float:
        return self._macro("f1")

    @property
    def balanced_accuracy(self) -> float:
        return self._macro("recall")

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "accuracy": self.accuracy, "macro_f1": self.macro_f1,
                "balanced_accuracy": self.balanced_accuracy, "per_class": self.per_class(),
                "confusion": self.confusion.tolist(), "labels": self.labels,
                "skipped": [{"path": p, "reason": r} for p, r in self.skipped], "files": self.files}


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else 0.0


def evaluate(model: str | os.PathLike[str] | Predictor, folder: str | os.PathLike[str], *,
             out: str | os.PathLike[str] | None = None, batch_size: int = DEFAULT_BATCH_SIZE, tta: bool = False,
             backend: str = "auto") -> Evaluation:
    """Score ``model`` on ``folder/<class>/<images>`` (class names from the model's labels).

    Writes metrics.json, per_class.csv, confusion.csv, confusion.png and predictions.csv to ``out``
    (default: ``<model>/eval-<folder name>``); unreadable images are skipped and listed.
    """
    predictor = model if isinstance(model, Predictor) else load(model, backend)
    folder = Path(folder)
    samples = labelled_images(folder, predictor.labels)
    index = {label: i for i, label in enumerate(predictor.labels)}
    confusion = np.zeros((len(index), len(index)), dtype=np.int64)
    result = Evaluation(predictor.labels, confusion)
    paths = [p for p, _ in samples]
    truth = dict(samples)
    for prediction in predictor.predict_iter(paths, top_k=1, batch_size=batch_size, tta=tta):
        true = truth[Path(prediction.source)]
        if not prediction.ok:
            result.skipped.append((prediction.source, prediction.error or ""))
            continue
        confusion[index[true], index[prediction.label]] += 1
        result.predictions.append((prediction.source, true, prediction.label, prediction.score))
    if result.images == 0:
        raise UsageError(f"none of the {len(samples)} images under {folder} could be read")
    if out is None:
        base = predictor.source if isinstance(model, Predictor) else Path(model)
        out = (base if base.is_dir() else base.parent) / f"eval-{folder.resolve().name}"
    write_evaluation(result, Path(out))
    return result


def labelled_images(folder: Path, labels: Sequence[str]) -> list[tuple[Path, str]]:
    """``(file, class name)`` for ``folder/<class>/**/<image>``; every class folder must be a model label."""
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder; evaluate needs a labelled folder DIR/<class>/<images>")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not is_ignored(d))
    unknown = [c for c in classes if c not in labels]
    if unknown:
        hint = ""
        if set(unknown) & {"train", "val", "valid", "validation", "test"}:
            hint = f" ({folder} looks like a split layout: evaluate one split, e.g. {folder / 'val'})"
        raise UsageError(f"class folders {', '.join(unknown)} in {folder} are not labels of the model{hint}; "
                         f"the model knows: {', '.join(labels)}")
    samples = [(p, c) for c in classes for p in _folder_images(folder / c)]
    if not samples:
        raise UsageError(f"no images under {folder}: expected {folder}/<class>/<images>")
    return samples


def write_evaluation(result: Evaluation, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result.files = {name: str(out / name) for name in
                    ("metrics.json", "per_class.csv", "confusion.csv", "confusion.png", "predictions.csv")}
    runs.atomic_write_bytes(out / "per_class.csv", _csv(
        ["label", "precision", "recall", "f1", "support", "predicted"],
        ([r[k] for k in ("label", "precision", "recall", "f1", "support", "predicted")] for r in result.per_class())))
    runs.atomic_write_bytes(out / "confusion.csv", _csv(
        ["true \\ predicted", *result.labels],
        ([label, *row] for label, row in zip(result.labels, result.confusion.tolist(), strict=True))))
    runs.atomic_write_bytes(out / "predictions.csv", _csv(["path", "true", "predicted", "score"], result.predictions))
    plot_confusion(result.confusion, result.labels, out / "confusion.png")
    runs.write_json(out / "metrics.json", result.to_dict())


def _csv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()


def plot_confusion(confusion: np.ndarray, labels: Sequence[str], path: Path) -> None:
    """Rows normalised to recall for the colours, raw counts as the numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.55 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=f"confusion matrix ({int(confusion.sum())} images)")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    runs.atomic_write_bytes(path, buffer.getvalue())



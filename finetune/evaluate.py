"""Evaluate a model on a labelled folder: accuracy, macro-F1, balanced accuracy, per-class scores, the
confusion matrix, and the files that hold them.

``evaluate(model, folder)`` predicts every image of ``folder/<class>/`` with a `finetune.predict.Predictor`
(a run folder, an export or a loaded Predictor) and writes metrics.json, per_class.csv, confusion.csv,
confusion.png and predictions.csv.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .data.paths import is_ignored
from .errors import UsageError
from .files import atomic_write_bytes, atomic_write_json
from .plots import plot_confusion
from .predict import DEFAULT_BATCH_SIZE, Predictor, find_images, load


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
             backend: str = "auto", accelerator: str = "auto") -> Evaluation:
    """Score ``model`` on ``folder/<class>/<images>`` (class names from the model's labels); ``backend`` and
    ``accelerator`` are `finetune.predict.load`'s.

    Writes metrics.json, per_class.csv, confusion.csv, confusion.png and predictions.csv to ``out``
    (default: ``<model>/eval-<folder name>``); unreadable images are skipped and listed.
    """
    predictor = model if isinstance(model, Predictor) else load(model, backend, accelerator=accelerator)
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
    samples = [(p, c) for c in classes for _, p in find_images([folder / c])]  # a folder: files only
    if not samples:
        raise UsageError(f"no images under {folder}: expected {folder}/<class>/<images>")
    return samples


def write_evaluation(result: Evaluation, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result.files = {name: str(out / name) for name in
                    ("metrics.json", "per_class.csv", "confusion.csv", "confusion.png", "predictions.csv")}
    atomic_write_bytes(out / "per_class.csv", _csv(
        ["label", "precision", "recall", "f1", "support", "predicted"],
        ([r[k] for k in ("label", "precision", "recall", "f1", "support", "predicted")] for r in result.per_class())))
    atomic_write_bytes(out / "confusion.csv", _csv(
        ["true \\ predicted", *result.labels],
        ([label, *row] for label, row in zip(result.labels, result.confusion.tolist(), strict=True))))
    atomic_write_bytes(out / "predictions.csv", _csv(["path", "true", "predicted", "score"], result.predictions))
    plot_confusion(result.confusion, result.labels, out / "confusion.png", images="images")
    atomic_write_json(out / "metrics.json", result.to_dict())


def _csv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()

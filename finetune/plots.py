"""The run folder's plots, each a PNG that reads at a glance: loss and accuracy per epoch (``curves.png``), the
learning rate of each parameter group (``lr.png``), the probe's weight-decay sweep (``probe.png``), the
normalised confusion matrix (``confusion.png``), per-class precision, recall and F1 (``per_class.png``), the
most confidently wrong images (``wrong.png``) and the reliability diagrams (``reliability.png``).

Each function writes its file and returns the matplotlib ``Figure`` (drawn without pyplot: no global state,
no window), so that a test can read its axes, labels and data.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .files import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
CELL_NUMBERS_UP_TO = 20  # classes; above this the confusion matrix's cells are too small for their numbers


def figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save_figure(fig: Figure, path: Path) -> Figure:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    atomic_write_bytes(path, buffer.getvalue())
    return fig


def plot_curves(rows: list[dict[str, float]], path: Path, *, probe: Mapping[str, float] | None = None,
                head_only_epochs: int = 0) -> Figure | None:
    """Train and validation loss and accuracy per epoch, from ``runs.read_epoch_metrics``. ``probe``: the
    train/val accuracy of the probed head an LP-FT run started from (drawn at epoch 0); ``head_only_epochs``:
    the first epochs trained the head alone (shaded)."""
    if not rows:
        return None
    fig = figure(11, 4.2)
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = [r["epoch"] + 1 for r in rows]
    series = [("train", "train (augmented)"), ("val", "validation")]
    series += [("val_ema", "validation, EMA weights")] if any("val_ema/acc" in r for r in rows) else []
    for metric, ax in (("loss", ax_loss), ("acc", ax_acc)):
        for prefix, label in series:
            values = [r.get(f"{prefix}/{metric}", math.nan) for r in rows]
            if not all(math.isnan(v) for v in values):
                ax.plot(epochs, values, marker="o", label=label)
        if head_only_epochs:
            ax.axvspan(0.5, head_only_epochs + 0.5, color="grey", alpha=0.15, label="head only (backbone frozen)")
    if probe:
        ax_acc.plot([0], [probe["train_acc"]], marker="*", markersize=13, linestyle="", color="C0",
                    label="linear probe: train")
        ax_acc.plot([0], [probe["val_acc"]], marker="*", markersize=13, linestyle="", color="C1",
                    label="linear probe: validation")
        for ax in (ax_loss, ax_acc):
            ax.axvline(0.5, color="grey", linestyle=":", label="probe | fine-tuning")
            ax.set_xlim(-0.4, max(epochs) + 0.4)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    return save_figure(fig, path)


def plot_lr(series: Mapping[str, Sequence[tuple[int, float]]], path: Path,
            epoch_ends: Sequence[int] = ()) -> Figure | None:
    """The learning rate of each parameter group per training step (``runs.read_step_metrics(..., "lr/")``),
    the head first, then the stages from the top down; dotted lines end the epochs."""
    if not series:
        return None
    names = sorted(series, key=_group_order)
    stages = [_stage(n) for n in names if _stage(n) is not None]
    top = max(stages, default=None)
    fig = figure(9, 4.5)
    ax = fig.subplots()
    colours = _colours(len(names))
    for name, colour in zip(names, colours, strict=True):
        steps = [s for s, _ in series[name]]
        rates = [r if r > 0 else math.nan for _, r in series[name]]  # a frozen group's 0 has no log
        ax.plot(steps, rates, color=colour, marker="." if len(steps) < 30 else None, label=_group_label(name, top))
    for i, step in enumerate(epoch_ends):
        ax.axvline(step, color="grey", linestyle=":", linewidth=0.8, label="end of an epoch" if i == 0 else None)
    positive = [r for values in series.values() for _, r in values if r > 0]
    if positive:
        log_axis(ax, "y", min(positive), max(positive))
    ax.set(xlabel="training step", ylabel="learning rate", title="learning rate per parameter group")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3, which="both")
    if len(names) > 6:
        fig.legend(loc="outside right upper", fontsize=8)
    else:
        ax.legend(fontsize=9)
    return save_figure(fig, path)


def log_axis(ax, which: str, low: float, high: float) -> None:
    """A log scale whose tick labels are plain numbers (0.001, 1e-05): no mathtext, whose fonts some matplotlib
    installations lack; minor ticks are labelled only when the data span less than a decade."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    axis.set_major_formatter(plain)
    axis.set_minor_formatter(plain if high < 10 * low else NullFormatter())


def _stage(name: str) -> int | None:
    digits = name.removeprefix("stage")
    return int(digits) if name.startswith("stage") and digits.isdigit() else None


def _group_order(name: str) -> tuple[int, int, str]:
    stage = _stage(name)
    return (0, 0, name) if name == "head" else (1, -stage, name) if stage is not None else (2, 0, name)


def _group_label(name: str, top: int | None) -> str:
    stage = _stage(name)
    if stage is None:
        return name
    return f"stage {stage}" + (" (top)" if stage == top and top else " (stem)" if stage == 0 else "")


def _colours(n: int) -> list:
    from matplotlib import colormaps

    return [colormaps["tab10"](i) for i in range(n)] if n <= 10 else \
        [colormaps["viridis"](i / max(1, n - 1)) for i in range(n)]


def plot_probe_sweep(sweep: list[dict[str, float]], path: Path, chosen: float | None = None) -> Figure:
    """Train and validation accuracy of the probe for each weight decay tried; ``chosen``: the one kept."""
    fig = figure(6.5, 4.2)
    ax = fig.subplots()
    decays = [row["weight_decay"] for row in sweep]
    ax.plot(decays, [row["train_acc"] for row in sweep], marker="o", label="train")
    ax.plot(decays, [row["val_acc"] for row in sweep], marker="o", label="validation")
    if "val_balanced_acc" in sweep[0]:
        ax.plot(decays, [row["val_balanced_acc"] for row in sweep], marker=".", linestyle="--",
                label="validation, balanced")
    if chosen is not None:
        ax.axvline(chosen, color="grey", linestyle=":", label=f"chosen: {chosen:g}")
    log_axis(ax, "x", min(decays), max(decays))
    ax.set(xlabel="weight decay", ylabel="top-1 accuracy", title="linear probe on cached features")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return save_figure(fig, path)


def plot_confusion(confusion: np.ndarray, labels: Sequence[str], path: Path, images: str = "validation images"
                   ) -> Figure:
    """The confusion matrix with each row divided by its true class's images (a row sums to 1; the diagonal is
    each class's recall); the shares are written in the cells up to ``CELL_NUMBERS_UP_TO`` classes. ``images``
    names what was counted, in the title."""
    n = len(labels)
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    side = min(max(5.0, 0.42 * n + 3.0), 24.0)
    fig = figure(side + 1.5, side)
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if n <= CELL_NUMBERS_UP_TO:
        for i, j in zip(*np.nonzero(confusion), strict=True):
            ax.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=9 if n <= 10 else 7,
                    color="white" if rates[i, j] > 0.5 else "black")
    font = 9 if n <= 20 else 8 if n <= 50 else 7  # a row is at least 0.2 in: 7 pt fits
    big = 10 + round(side / 6)  # titles grow with the figure, or they vanish on a 24-inch one
    ax.set_xticks(range(n), labels, rotation=60, ha="right", rotation_mode="anchor", fontsize=font)
    ax.set_yticks(range(n), labels, fontsize=font)
    ax.set_xlabel("predicted class", fontsize=big)
    ax.set_ylabel("true class", fontsize=big)
    ax.set_title(f"confusion matrix, rows normalised ({int(confusion.sum())} {images})", fontsize=big)
    fig.colorbar(image, ax=ax, shrink=0.8).set_label("share of the true class's images", fontsize=big)
    return save_figure(fig, path)


def plot_per_class(rows: Sequence[Mapping], path: Path) -> Figure:
    """Per-class F1 (bars), precision and recall (markers), one row per class with its image count, the worst F1
    at the top. ``rows``: dicts with label, precision, recall, f1 and support."""
    ordered = sorted(rows, key=lambda r: (-r["f1"], r["label"]))  # drawn bottom-up: the worst F1 ends on top
    n = len(ordered)
    fig = figure(8.5, min(max(3.5, 0.27 * n + 1.8), 40.0))
    ax = fig.subplots()
    y = np.arange(n)
    ax.barh(y, [r["f1"] for r in ordered], color="C0", alpha=0.75, label="F1")
    ax.plot([r["precision"] for r in ordered], y, "o", color="C1", label="precision")
    ax.plot([r["recall"] for r in ordered], y, "D", color="C2", markersize=5, label="recall")
    ax.set_yticks(y, [f"{r['label']} ({r['support']})" for r in ordered], fontsize=9 if n <= 40 else 8)
    ax.tick_params(axis="x", labeltop=n > 30)  # a tall plot: the scale at the top too
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_xlim(0, 1.02)
    ax.set(xlabel="score on the validation images", ylabel="class (validation images)",
           title="per-class scores, worst F1 at the top")
    ax.grid(alpha=0.3, axis="x")
    fig.legend(loc="outside upper center", ncols=3, fontsize=9)
    return save_figure(fig, path)


def plot_wrong(images: Sequence[tuple[np.ndarray, str]], path: Path, columns: int = 4) -> Figure | None:
    """A grid of (image, title) pairs: the most confidently wrong predictions, titled with the true and the
    predicted class."""
    if not images:
        return None
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    fig = figure(max(2.7 * columns, 5.0), 2.9 * rows + 0.6)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, (image, title) in zip(axes, images, strict=False):
        ax.imshow(image, interpolation="nearest" if max(image.shape[:2]) < 96 else "antialiased")
        ax.set_title(title, fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle("most confidently wrong validation images\n(wrong labels or hard cases)", fontsize=11)
    return save_figure(fig, path)


def plot_reliability(panels: Sequence[tuple[str, Mapping[str, Sequence[float]], float]], path: Path) -> Figure:
    """One reliability diagram per (title, bins, ECE): accuracy against mean confidence in equal-width confidence
    bins (``calibration.reliability_bins``), the gap to the mean confidence hatched, each bin's image count."""
    fig = figure(5.2 * len(panels), 4.6)
    axes = fig.subplots(1, len(panels), squeeze=False).ravel()
    for ax, (title, bins, ece) in zip(axes, panels, strict=True):
        n = len(bins["count"])
        used = np.asarray(bins["count"]) > 0
        centres = (np.arange(n) + 0.5)[used] / n
        accuracy, confidence = np.asarray(bins["accuracy"])[used], np.asarray(bins["confidence"])[used]
        ax.bar(centres, accuracy, width=1 / n, color="C0", edgecolor="white", alpha=0.85, label="accuracy")
        ax.bar(centres, confidence - accuracy, bottom=accuracy, width=1 / n, facecolor="none", edgecolor="C3",
               hatch="///", linewidth=0.8, label="gap to the mean confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfectly calibrated")
        for x, count in zip(centres, np.asarray(bins["count"])[used], strict=True):  # few images: a noisy bar
            ax.text(x, 0.015, str(count), ha="center", va="bottom", fontsize=7, rotation=90 if count >= 1000 else 0)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top probability); at the bottom: images per bin",
               ylabel="accuracy in the bin", title=f"{title}: ECE {ece:.3f}")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)

"""The run folder's plots: loss and accuracy per epoch (``curves.png``), the probe's weight-decay sweep
(``probe.png``)."""

from __future__ import annotations

import math
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_curves(rows: list[dict[str, float]], path: Path) -> None:
    """Train and validation loss and accuracy per epoch, from ``runs.read_epoch_metrics``."""
    if not rows:
        return
    plt = _pyplot()
    epochs = [r["epoch"] + 1 for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ema = any("val_ema/acc" in r for r in rows)  # a moving average of the weights was scored too
    for metric, ax in (("loss", ax_loss), ("acc", ax_acc)):
        series = [(f"train/{metric}", "train"), (f"val/{metric}", "validation")]
        series += [(f"val_ema/{metric}", "validation, EMA weights")] if ema else []
        for key, label in series:
            ax.plot(epochs, [r.get(key, math.nan) for r in rows], marker="o", label=label)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_probe_sweep(sweep: list[dict[str, float]], path: Path) -> None:
    """Train and validation accuracy of the probe for each weight decay tried."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    decays = [row["weight_decay"] for row in sweep]
    ax.semilogx(decays, [row["train_acc"] for row in sweep], marker="o", label="train")
    ax.semilogx(decays, [row["val_acc"] for row in sweep], marker="o", label="validation")
    if "val_balanced_acc" in sweep[0]:
        ax.semilogx(decays, [row["val_balanced_acc"] for row in sweep], marker="o", label="validation, balanced")
    ax.set(xlabel="weight decay", ylabel="top-1 accuracy", title="linear probe on cached features")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""The lr-find phase: a learning-rate range test before the epochs (``finetune lr-find``, ``fit --set lr=auto``).

Lightning's ``Tuner.lr_find`` trains the module for up to ``steps`` batches while the rate grows exponentially
from ``min_lr`` to ``max_lr``, then restores the weights, the optimiser and the random state it started from.
It runs on the module as the epochs would start it: the same trainable stages (after a probe, every stage the
recipe unfreezes; before a head warm-up, the head alone), the same optimiser and per-group rates, the swept rate
standing for the head's (``recipe.lr``) and every stage keeping its share of it (``TransferModule.lr_ratios``).
There is no warm-up during the sweep.

The module hands every step's loss, unsmoothed, to a recorder here, which smooths it (``SMOOTHING``) and stops
the sweep once the smoothed loss passes ``BLOWN_UP`` times its lowest. Lightning's own curve is a running average
with beta 0.98: it lags some 50 steps, half a sweep, and its first values are halved (its bias correction is one
step off), so that with small noisy batches its own 4x-the-best stop fired after a handful of steps at 1e-5.

The suggestion is fastai's "valley" rule on the smoothed loss: halfway along the longest valley, the longest
stretch over which the loss keeps reaching new lows. Lightning's ``suggestion()`` (the steepest descent)
differentiates with respect to the rate rather than its logarithm, which favours the lowest rates, and after a
probe (LP-FT) the loss is nearly flat until the rate turns destructive: on the demo folder with seeds 0, 1, 2 it
gave 3.6e-5, 2.8e-5 and 6.9e-6, where the shallow decline starts, 30 to 150 times below the recipe's 1e-3; the
valley gave 5.0e-4, 6.6e-4 and 2.9e-4 (docs/recipes.md).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
from pytorch_lightning.tuner import Tuner

from ..data import ImageFolderDataModule
from ..device import Device
from ..errors import FinetuneError
from ..files import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..model.depthwise import small_map_backward
from ..model.module import TransferModule
from ..recipes import Recipe
from ..runtime import Precision

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger("finetune")

STEPS = 100  # Lightning's default; on the demo folder the loss blows up after about 75 (docs/recipes.md)
MIN_STEPS = 20  # the rule skips the first tenth and needs a valley after it
MIN_LR, MAX_LR = 1e-6, 1.0  # six decades; recipes accept rates up to 1
SMOOTHING = 0.9  # beta of the loss's running average: a lag of about 10 steps
BLOWN_UP = 4.0  # the sweep stops when the smoothed loss passes this x its lowest (Lightning's and fastai's)
RULE = "valley"
PLOT, POINTS, RESULT = "lr_find.png", "lr_find.csv", "lr_find.json"
_EXPECTED_WARNINGS = (".*does not have many workers.*", ".*module\\(s\\) in eval mode.*", ".*weights_only.*",
                      ".*max_epochs.*", ".*LeafSpec.*")


class LrFindFailed(FinetuneError):
    """The sweep gave no curve to read a rate from (exit status 1: nothing was wrong with the arguments)."""

    exit_status = 1


@dataclass
class LrFinding:
    """The sweep's curve and what it suggests. ``suggested``: the rule's rate; ``lr``: the rate to use, the
    suggestion within the recipe's range (at most 1) rounded to two significant digits. Both None, with
    ``failure`` saying why, when the curve has no valley."""

    recipe: str
    lrs: list[float]
    losses: list[float]  # each step's training loss
    smoothed: list[float]  # up to the first non-finite loss
    index: int | None  # of the suggested point
    suggested: float | None
    lr: float | None
    failure: str
    trained: str  # what the sweep trained, in words
    min_lr: float
    max_lr: float
    steps: int  # asked for; len(lrs) ran
    seconds: float
    rule: str = RULE

    @property
    def stopped_early(self) -> bool:
        return len(self.lrs) < self.steps

    def to_summary(self) -> dict[str, Any]:
        """For ``summary.json``: everything but the curve, which is in ``lr_find.csv``."""
        values = {k: v for k, v in asdict(self).items() if k not in ("lrs", "losses", "smoothed")}
        return values | {"steps_run": len(self.lrs), "stopped_early": self.stopped_early, "plot": PLOT,
                         "points": POINTS}

    def to_json(self) -> dict[str, Any]:
        return self.to_summary() | {"curve": {"lr": self.lrs, "loss": self.losses, "smoothed_loss": self.smoothed}}

    def checked(self) -> LrFinding:
        """Itself, when it has a suggestion; else ``LrFindFailed`` with the cause."""
        if self.lr is None:
            raise LrFindFailed(self.failure)
        return self


def find_lr(module: TransferModule, datamodule: ImageFolderDataModule, recipe: Recipe, *, device: Device,
            precision: Precision, steps: int | None = None, min_lr: float = MIN_LR, max_lr: float = MAX_LR,
            progress: bool = True) -> LrFinding:
    """Lightning's range test on ``module`` as its first epoch would train it; the module is left as it was
    (its weights, buffers and trainable flags). ``steps``: None for ``STEPS``. ``LrFinding.checked()`` raises
    when the curve had no valley."""
    steps = STEPS if steps is None else steps
    classifier = module.classifier
    trainable = [p.requires_grad for p in classifier.parameters()]
    stages = recipe.unfreeze_stages if module.start_epoch == 0 else 0  # a head warm-up trains the head alone
    classifier.set_trainable(stages)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="finetune-lr-find-") as scratch:  # the finder's checkpoint
        trainer = pl.Trainer(
            accelerator=device.accelerator, devices=1, precision=precision.lightning, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, check_val_every_n_epoch=10**9,  # the sweep never validates
            max_steps=steps, gradient_clip_val=recipe.gradient_clip or None, default_root_dir=scratch)
        module.sweep = recorder = _Recorder(skip=steps // 10)
        try:
            with _quiet(progress), small_map_backward(classifier, cpu=device.kind == "cpu"):
                finder = Tuner(trainer).lr_find(module, datamodule=datamodule, min_lr=min_lr, max_lr=max_lr,
                                                num_training=steps, mode="exponential", early_stop_threshold=None,
                                                update_attr=False)
        finally:
            module.sweep = None
            module.train_metrics.reset()  # the sweep's batches are not the first epoch's
            for p, flag in zip(classifier.parameters(), trainable, strict=True):
                p.requires_grad_(flag)
    n = min(len(finder.results["lr"]), len(recorder.losses))  # one of each per step
    lrs, losses = [float(x) for x in finder.results["lr"][:n]], recorder.losses[:n]
    smoothed, index, failure = suggest(lrs, losses)
    suggested = None if index is None else lrs[index]
    lr = None if suggested is None else float(f"{min(suggested, 1.0):.2g}")
    trained = "the head" if stages == 0 else \
        f"the head and {'every stage' if stages < 0 else f'the top {stages} stage(s)'} of the backbone"
    return LrFinding(recipe.name, lrs, losses, smoothed, index, suggested, lr, failure, trained, min_lr, max_lr,
                     steps, time.perf_counter() - started)


def suggest(lrs: Sequence[float], losses: Sequence[float]) -> tuple[list[float], int | None, str]:
    """(the smoothed losses, the index of the suggested rate, why there is none). The curve ends at its first
    non-finite loss; the rule skips its first tenth (an average of a few steps is noise)."""
    finite = next((i for i, v in enumerate(losses) if not math.isfinite(v)), len(losses))
    smoothed = smooth(losses[:finite])
    skip = len(lrs) // 10
    if finite - skip < MIN_STEPS // 2:
        ended = f"the loss turned NaN at lr {lrs[finite]:.2g}" if finite < len(losses) else "the sweep ended"
        return smoothed, None, (f"lr-find: only {finite} step(s) before {ended}, too few to read a curve; "
                                "start from a lower rate or give more steps (--num-steps)")
    start, end = longest_valley(smoothed[skip:])
    if end - start < 2:
        return smoothed, None, (f"lr-find: the smoothed loss never kept falling between lr {lrs[skip]:.2g} and "
                                f"{lrs[finite - 1]:.2g}, so there is no rate to suggest; see the plot, and "
                                "`finetune check` for the usual causes")
    return smoothed, skip + start + (end - start) // 2, ""


class _Recorder:
    """Every step's loss; True (stop) once the smoothed loss is non-finite or, after the first ``skip`` steps,
    ``BLOWN_UP`` times its lowest."""

    def __init__(self, skip: int) -> None:
        self.losses: list[float] = []
        self.skip = skip
        self.average, self.lowest = 0.0, math.inf

    def __call__(self, loss: float) -> bool:
        self.losses.append(loss)
        self.average = SMOOTHING * self.average + (1 - SMOOTHING) * loss
        smoothed = self.average / (1 - SMOOTHING ** len(self.losses))
        if not math.isfinite(smoothed):
            return True
        if len(self.losses) <= self.skip:
            return False
        self.lowest = min(self.lowest, smoothed)
        return smoothed > BLOWN_UP * self.lowest


def smooth(values: Sequence[float], beta: float = SMOOTHING) -> list[float]:
    """The bias-corrected running average (Adam's): value ``t`` is the weighted mean of values 0..t."""
    out, average = [], 0.0
    for t, value in enumerate(values, start=1):
        average = beta * average + (1 - beta) * value
        out.append(average / (1 - beta**t))
    return out


def longest_valley(losses: Sequence[float]) -> tuple[int, int]:
    """(start, end) of the longest valley: ``end`` closes the longest strictly falling subsequence, which
    started (at the latest) its length before it, fastai's estimate."""
    n = len(losses)
    length = [1] * n  # of the longest falling subsequence that ends at i
    for i in range(1, n):
        length[i] = 1 + max((length[j] for j in range(i) if losses[j] > losses[i]), default=0)
    end = max(range(n), key=lambda i: (length[i], -i))  # the first of the longest
    return max(0, end - length[end] + 1), end


def plot_lr_find(finding: LrFinding, path: Path, title: str) -> Figure:
    """The loss against the learning rate (log axis), each step and smoothed, the suggestion marked; writes
    ``path`` and returns the figure."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig = Figure(figsize=(8, 4.8), dpi=100, layout="constrained")
    ax = fig.subplots()
    n = len(finding.smoothed)
    ax.plot(finding.lrs[:n], finding.losses[:n], color="0.75", linewidth=0.8, label="loss of each step")
    ax.plot(finding.lrs[:n], finding.smoothed, color="C0", linewidth=2,
            label=f"smoothed (running average, beta {SMOOTHING})")
    if finding.index is not None:
        x, y = finding.lrs[finding.index], finding.smoothed[finding.index]
        ax.axvline(x, color="C3", linestyle="--", linewidth=1)
        ax.plot([x], [y], "o", color="C3", markersize=9, label=f"suggested lr {finding.lr:.2g} ({finding.rule})")
    ax.set_xscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 0.001, 1e-05: no mathtext, whose fonts may be missing
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("learning rate of the head (stages keep their share of it)")
    ax.set_ylabel("training loss")
    if finding.smoothed:  # the smoothed curve sets the scale: the spikes of single steps may leave the axes
        low, high = min(finding.smoothed), max(finding.smoothed)
        ax.set_ylim(low - 0.1 * (high - low) - 1e-3, high + 0.3 * (high - low) + 1e-3)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    ax.set_title(title, fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return fig


def write_lr_find(finding: LrFinding, folder: Path, title: str) -> Figure:
    """``lr_find.png``, ``lr_find.csv`` (lr, loss, smoothed loss per step) and ``lr_find.json`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(["lr", "loss", "smoothed_loss"])
    smoothed = finding.smoothed + [math.nan] * (len(finding.lrs) - len(finding.smoothed))
    writer.writerows(zip(finding.lrs, finding.losses, smoothed, strict=True))
    atomic_write_text(folder / POINTS, rows.getvalue())
    atomic_write_json(folder / RESULT, finding.to_json())
    return plot_lr_find(finding, folder / PLOT, title)


def read_summary(folder: Path) -> dict[str, Any] | None:
    """The summary of the sweep a run folder holds (a resumed ``lr=auto`` run), or None."""
    path = folder / RESULT
    if not path.is_file():
        return None
    return {k: v for k, v in json.loads(path.read_text()).items() if k != "curve"}


@contextlib.contextmanager
def _quiet(progress: bool):
    """Lightning's expected warnings off; without ``progress``, its sweep's progress bar too (stderr)."""
    with warnings.catch_warnings():
        for message in _EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message)
        if progress:
            yield
        else:
            with contextlib.redirect_stderr(io.StringIO()):
                yield

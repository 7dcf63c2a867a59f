"""The run report: ``report.md`` and a self-contained ``report.html`` (every plot inlined) in the run folder, with
the PNG plots they show. ``fit`` writes it last; ``write_report(RUN)`` (``finetune report RUN``) writes it again
from the run folder alone, without the model:

- the run: data, recipe and why it was chosen, how the model was trained and selected, the metrics, and the
  train/validation gap read in one sentence (overfitting, underfitting or fine, with what to try);
- training: ``curves.png`` (loss and accuracy per epoch; an LP-FT run's probe at epoch 0), ``lr.png`` (each
  parameter group's learning rate per step) and ``probe.png`` (the probe's weight-decay sweep; a run without
  epochs has this one alone);
- from ``val_predictions.npz``: ``confusion.png`` (rows normalised) with the most confused class pairs,
  ``per_class.png`` with a table of precision, recall and F1, ``wrong.png`` (the validation images predicted
  wrong with the highest probability: often wrong labels; read from the data folder) and ``reliability.png``
  (reliability diagrams before and after temperature scaling);
- the recipe, as ``recipe.toml`` holds it.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tomllib

from . import plots, runs
from .files import atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

WRONG_SHOWN = 16  # images in wrong.png
PAIRS_SHOWN = 10  # rows of the most-confused-pairs table
THUMBNAIL = 160  # pixels: the longer side of an image in wrong.png
# The gap sentence. Training accuracy this far above validation accuracy is overfitting; below UNDERFIT_ACC
# with validation close to it (within UNDERFIT_GAP), the model does not fit even its training images.
OVERFIT_GAP = 0.05
UNDERFIT_ACC = 0.90
UNDERFIT_GAP = 0.03
VAL_LOSS_RISE = 1.10  # the last epoch's validation loss over this x its lowest: overfitting late in the run


@dataclass
class Report:
    """What ``write_report`` wrote: the files, and each plot's figure by file name (for tests and notebooks)."""

    run_dir: Path
    files: list[Path]
    figures: dict[str, Figure] = field(repr=False)


# The report as blocks, rendered once as markdown and once as HTML. A str is a paragraph (with `code` and
# **bold**), a list of str a bulleted list.
@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: list[tuple[str, ...]]


@dataclass(frozen=True)
class Image:
    name: str


@dataclass(frozen=True)
class Code:
    text: str


Block = str | list[str] | Heading | Table | Image | Code


def write_report(run_dir: str | Path) -> Report:
    """Write ``report.md``, ``report.html`` and the plots of a finished run folder (one with summary.json)."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    recipe_text = (run_dir / "recipe.toml").read_text() if (run_dir / "recipe.toml").is_file() else ""
    recipe = tomllib.loads(recipe_text)
    rows = [r for r in runs.read_epoch_metrics(run_dir / "metrics.csv") if r["epoch"] < summary["epochs_run"]]
    figures: dict[str, Figure] = {}
    blocks: list[Block] = [*_overview(summary), *_verdict(summary, rows, recipe),
                           *_training(run_dir, summary, rows, recipe, figures)]
    predictions = runs.read_val_predictions(run_dir)
    if predictions is None:
        blocks += [Heading("Validation predictions"),
                   f"This run folder has no `{runs.VAL_PREDICTIONS}` (it was written by an older finetune), so the "
                   "confusion matrix, per-class scores, wrong images and reliability diagrams are missing: a new "
                   "`finetune fit` writes them."]
    else:
        blocks += _validation(run_dir, summary, predictions, figures)
    blocks += [Heading("Recipe"), f"**{summary['recipe']}**: {summary['recipe_reason']}", Code(recipe_text.strip())]
    title = f"Run {summary['run_dir']}"
    atomic_write_text(run_dir / "report.md", _markdown([Heading(title, 1), *blocks]))
    atomic_write_text(run_dir / "report.html", _html(title, blocks, run_dir))
    files = [run_dir / name for name in figures] + [run_dir / "report.md", run_dir / "report.html"]
    return Report(run_dir, files, figures)


# --- the run ---------------------------------------------------------------------------------------------------
def _overview(summary: dict[str, Any]) -> list[Block]:
    val, test = summary.get("val", {}), summary.get("test", {})
    resolution, inference = summary["resolution"], summary.get("inference")
    selected = f"model selected by: {summary['selection']}"
    items = [
        f"data: `{summary['data_dir']}`: {summary['num_classes']} classes, {summary['train_images']} train / "
        f"{summary['val_images']} validation / {summary['test_images']} test images ({summary['split_source']} "
        "split)",
        f"recipe: **{summary['recipe']}** ({summary['recipe_reason']})",
        f"training: {summary['training']}",
        f"{selected} (the validation scores are optimistic; the test split was used for nothing but the scores "
        "below)" if test else selected,
        f"backbone: `{summary['model']}`, precision {summary['precision']}{_processes(summary)}",
        f"input resolution: {resolution['reason']}",
        f"input crop: {resolution.get('crop_reason', 'the backbone centre crop')}",
        *([f"each prediction: {' + '.join(inference['views'])} through {' + '.join(inference['backbones'])}"]
          if inference else []),
        *([f"weights kept: {summary['ema']['sentence']}"] if summary.get("ema") else []),
        f"skipped unreadable files: {summary['skipped_files']}",
        f"time: {summary['timings']['total_s']:.0f} s ({summary['train_images_per_s']:.1f} training images/s)",
    ]
    header = ("metric", "validation (used for selection)", *(("test (held out)",) if test else ()))
    metrics = [(k, f"{v:.4f}", *((f"{test[k]:.4f}" if k in test else "",) if test else ())) for k, v in val.items()]
    return [items, Table(header, metrics)]


def _processes(summary: dict[str, Any]) -> str:
    """", on 2 processes: 1 machine(s) x 2 device(s) (DDPStrategy, global batch 64)" for a multi-process run."""
    p = summary.get("processes") or {}
    if p.get("world", 1) == 1:
        return ""
    how = f" ({p['strategy']}, global batch {p['global_batch']})" if "strategy" in p else ""
    return f", on {p['world']} processes: {p['num_nodes']} machine(s) x {p['devices']} device(s){how}"


def _probe_row(summary: dict[str, Any]) -> dict[str, float] | None:
    """The probe's sweep row of the weight decay it chose."""
    probe = summary.get("probe")
    if not probe:
        return None
    return next((r for r in probe["sweep"] if r["weight_decay"] == probe["weight_decay"]), None)


def _verdict(summary: dict[str, Any], rows: list[dict[str, float]], recipe: dict[str, Any]) -> list[Block]:
    return [Heading("Train / validation gap"), gap_sentence(summary, rows, recipe)]


def gap_sentence(summary: dict[str, Any], rows: list[dict[str, float]], recipe: dict[str, Any]) -> str:
    """Overfitting, underfitting or fine, read from the kept model's training and validation accuracy (and the
    validation loss over the epochs), with what to try."""
    best = next((r for r in rows if r["epoch"] == summary.get("best_epoch")), None)
    if best is not None and "train/acc" in best and summary.get("kept") != "probe":
        path, train, where = "epochs", best["train/acc"], f"at the kept epoch {int(best['epoch']) + 1}"
        measured = "training accuracy (on augmented images, while training)"
    elif (probe := _probe_row(summary)) is not None:
        path, train, where = "probe", probe["train_acc"], "for the probed head"
        measured = "training accuracy (on the cached training features)"
    else:
        return "No training accuracy was recorded, so the gap to validation cannot be read."
    val = summary["val"]["acc"]
    gap = train - val
    rise = _val_loss_rise(rows) if path == "epochs" else None
    numbers = f"{where} the {measured} is {train:.3f} against {val:.3f} on validation (a gap of {100 * gap:.1f} points)"
    if rise:
        numbers += f", and the validation loss rose from {rise[0]:.3f} to {rise[1]:.3f} after its lowest epoch"
    if gap > OVERFIT_GAP or rise:
        verdict = "overfitting"
    elif train < UNDERFIT_ACC and gap < UNDERFIT_GAP:
        verdict = "underfitting"
    else:
        verdict = "fine"
    return f"**{verdict.capitalize()}**: {numbers}. Try {_advice(verdict, path, recipe)}."


def _val_loss_rise(rows: list[dict[str, float]]) -> tuple[float, float] | None:
    """(lowest, last) validation loss when the last is well above the lowest and the training loss kept falling."""
    scored = [r for r in rows if "val/loss" in r]
    if len(scored) < 3:
        return None
    low = min(scored, key=lambda r: r["val/loss"])
    last = scored[-1]
    falling = last.get("train/loss", math.inf) < low.get("train/loss", -math.inf)
    if last["val/loss"] > VAL_LOSS_RISE * low["val/loss"] and falling:
        return low["val/loss"], last["val/loss"]
    return None


def _advice(verdict: str, path: str, recipe: dict[str, Any]) -> str:
    if verdict == "overfitting" and path == "epochs":
        return ("stronger augmentation (`--set scale_min=0.2 --set color_jitter=0.3`), more regularisation "
                "(`--set weight_decay=0.1`, `--set drop_path=0.2`), fewer trained stages (`--set unfreeze_stages=2`), "
                "early stopping (`--set early_stopping=3`) or more images")
    if verdict == "overfitting":
        return ("more images, or augmented views of each training image in the probe (`--set feature_views=2`); "
                "its weight decay is already the best of a sweep on validation")
    if verdict == "underfitting" and path == "epochs":
        return ("more epochs (`--set epochs=N`), a higher learning rate (`--set lr=...`), more trained stages "
                "(`--set unfreeze_stages=-1`) or less regularisation (`--set label_smoothing=0 --set head_dropout=0`)")
    if verdict == "underfitting":
        several = ", a head on several stages (`--recipe small-different`)" if recipe.get("head") != "multistage" \
            else ""
        return f"fine-tuning the backbone (`--recipe large-different`){several} or a larger backbone (`--model NAME`)"
    return "more images or a larger backbone (`--model NAME`): neither a gap nor a low training accuracy holds it back"


def _training(run_dir: Path, summary: dict[str, Any], rows: list[dict[str, float]], recipe: dict[str, Any],
              figures: dict[str, Figure]) -> list[Block]:
    blocks: list[Block] = [Heading("Training")]
    probe = _probe_row(summary)
    if summary.get("probe"):
        figures["probe.png"] = plots.plot_probe_sweep(summary["probe"]["sweep"], run_dir / "probe.png",
                                                      summary["probe"]["weight_decay"])
    if not rows:
        blocks += ["No epochs: the head was fitted by L-BFGS on cached features of the frozen backbone (a linear "
                   "probe), so there are no per-epoch curves and no learning-rate schedule. The plot shows the "
                   "probe's training and validation accuracy for each weight decay tried."]
        return blocks + ([Image("probe.png")] if "probe.png" in figures else [])
    head_only = 0 if probe else int(recipe.get("freeze_epochs", 0))
    figures["curves.png"] = plots.plot_curves(rows, run_dir / "curves.png", probe=probe, head_only_epochs=head_only)
    blocks += ["Loss and accuracy per epoch, on the training images (augmented, as trained) and on validation."
               + (" The stars at epoch 0 are the linear probe (the head fitted on cached features) that the "
                  "epochs started from; the last plot of this section is its weight-decay sweep." if probe else "")
               + (" In the shaded epoch(s) only the head trained." if head_only else ""),
               Image("curves.png")]
    lr = plots.plot_lr(runs.read_step_metrics(run_dir / "metrics.csv", "lr/"), run_dir / "lr.png",
                       [int(r["step"]) for r in rows if "step" in r])
    if lr is not None:
        figures["lr.png"] = lr
        blocks += ["The learning rate of each parameter group per step (the head, then the backbone's stages from "
                   "the top down): warm-up, then cosine decay.", Image("lr.png")]
    else:
        blocks += ["`metrics.csv` has no learning rates: `lr/<group>` is logged every 5 training steps, and this run "
                   "had fewer or was written by an older finetune."]
    found = summary.get("lr_find")
    if found and (run_dir / "lr_find.png").is_file():  # fit --set lr=auto: the sweep that chose the rate
        blocks += [f"The learning rate came from lr-find (`--set lr=auto`): a sweep of {found['steps_run']} steps "
                   f"suggested {found['suggested']:.2g} ({found['rule']} rule), and the run trained at "
                   f"{found['lr']:.2g}.", Image("lr_find.png")]
    return blocks + ([Image("probe.png")] if "probe.png" in figures else [])


# --- the validation predictions --------------------------------------------------------------------------------
def _validation(run_dir: Path, summary: dict[str, Any], predictions: runs.ValPredictions,
                figures: dict[str, Figure]) -> list[Block]:
    classes = summary["classes"]
    temperature = float(summary.get("calibration", {}).get("temperature", 1.0))
    probabilities = _softmax(predictions.logits / temperature)
    predicted = probabilities.argmax(1)
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(confusion, (predictions.labels, predicted), 1)
    intro = (f"The sections below are about the {len(predictions.labels)} validation images, which also selected the "
             "model (and fitted its temperature): their scores are optimistic.")
    return [Heading("Validation predictions"), intro,
            *_confusion(run_dir, confusion, classes, figures),
            *_per_class(run_dir, confusion, classes, figures),
            *_wrong(run_dir, predictions, probabilities, classes, figures),
            *_calibration(run_dir, summary, predictions, temperature, figures)]


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _confusion(run_dir: Path, confusion: np.ndarray, classes: list[str], figures: dict[str, Figure]) -> list[Block]:
    figures["confusion.png"] = plots.plot_confusion(confusion, classes, run_dir / "confusion.png")
    blocks: list[Block] = [Heading("Confusion matrix", 3), "Each row is a true class, divided by its images: the "
                           "diagonal is each class's recall, the rest says what it is mistaken for.",
                           Image("confusion.png")]
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:PAIRS_SHOWN]
    pairs = [(i, j) for i, j in zip(*np.unravel_index(order, off.shape), strict=True) if off[i, j] > 0]
    if not pairs:
        return blocks + ["No validation image was mistaken for another class."]
    rows = [(classes[i], classes[j], str(off[i, j]), f"{off[i, j] / confusion[i].sum():.1%}") for i, j in pairs]
    return blocks + [Heading("Most confused class pairs", 3),
                     Table(("true class", "predicted as", "images", "share of the true class"), rows)]


def _per_class(run_dir: Path, confusion: np.ndarray, classes: list[str], figures: dict[str, Figure]) -> list[Block]:
    from .evaluate import Evaluation  # the per-class scores of `finetune evaluate`

    scores = Evaluation(list(classes), confusion).per_class()
    figures["per_class.png"] = plots.plot_per_class(scores, run_dir / "per_class.png")
    rows = [(r["label"], f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", str(r["support"]))
            for r in sorted(scores, key=lambda r: (r["f1"], r["label"]))]
    return [Heading("Per-class precision, recall and F1", 3), Image("per_class.png"),
            Table(("class", "precision", "recall", "F1", "images"), rows)]


def _wrong(run_dir: Path, predictions: runs.ValPredictions, probabilities: np.ndarray, classes: list[str],
           figures: dict[str, Figure]) -> list[Block]:
    predicted, confidence = probabilities.argmax(1), probabilities.max(1)
    wrong = np.flatnonzero(predicted != predictions.labels)
    shown = wrong[np.argsort(-confidence[wrong], kind="stable")][:WRONG_SHOWN]
    blocks: list[Block] = [Heading("Most confidently wrong", 3)]
    if not len(shown):
        return blocks + ["Every validation image was predicted right."]
    blocks.append(f"The {len(shown)} validation images predicted wrong with the highest probability (after "
                  "temperature scaling): a wrong label in the data is the usual cause, else a hard or ambiguous "
                  "image.")
    if not predictions.files:
        return blocks + ["The image files of the predictions were not recorded, so they cannot be shown."]
    found, missing = _thumbnails(predictions, shown, probabilities, classes)
    if not predictions.root.is_dir():
        blocks.append(f"The data folder `{predictions.root}` is not there any more (moved or deleted), so the images "
                      "cannot be shown; the table names them.")
    elif missing:
        blocks.append(f"{len(missing)} of them could not be read from `{predictions.root}`: "
                      + "; ".join(f"`{predictions.files[i]}` ({why})" for i, why in missing))
    figure = plots.plot_wrong(found, run_dir / "wrong.png")
    if figure is not None:
        figures["wrong.png"] = figure
        blocks.append(Image("wrong.png"))
    rows = [(predictions.files[i], classes[predictions.labels[i]], classes[predicted[i]], f"{confidence[i]:.3f}")
            for i in shown]
    return blocks + [Table(("file (in the data folder)", "label", "predicted", "probability"), rows)]


def _thumbnails(predictions: runs.ValPredictions, shown: np.ndarray, probabilities: np.ndarray,
                classes: list[str]) -> tuple[list[tuple[np.ndarray, str]], list[tuple[int, str]]]:
    """(thumbnail, title) of each shown image that reads, and (index, reason) of those that do not."""
    from PIL import Image as PILImage

    from .data.images import load_rgb
    from .errors import ImageDecodeError

    found, missing = [], []
    for i in shown:
        try:
            image = PILImage.fromarray(load_rgb(predictions.root / predictions.files[i]))
        except ImageDecodeError as e:
            missing.append((int(i), e.reason))
            continue
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        true, guess = classes[predictions.labels[i]], classes[probabilities[i].argmax()]
        found.append((np.asarray(image), f"true: {_short(true)}\npredicted: {_short(guess)} "
                                         f"(p={probabilities[i].max():.2f})"))
    return found, missing


def _short(label: str, width: int = 22) -> str:
    return label if len(label) <= width else label[:width - 1] + "…"


def _calibration(run_dir: Path, summary: dict[str, Any], predictions: runs.ValPredictions, temperature: float,
                 figures: dict[str, Figure]) -> list[Block]:
    import torch

    from .calibration import expected_calibration_error, reliability_bins

    labels = torch.from_numpy(predictions.labels).long()
    panels = []
    for title, t in (("before (T = 1)", 1.0), (f"after temperature scaling (T = {temperature:.3g})", temperature)):
        probabilities = torch.from_numpy(_softmax(predictions.logits / t))
        panels.append((title, reliability_bins(probabilities, labels),
                       expected_calibration_error(probabilities, labels)))
    figures["reliability.png"] = plots.plot_reliability(panels, run_dir / "reliability.png")
    fit = summary.get("calibration", {})
    nll = f", NLL {fit['nll_before']:.3f} -> {fit['nll_after']:.3f}" if "nll_before" in fit else ""
    return [Heading("Calibration", 3),
            f"Temperature scaling divides the logits by T = {temperature:.3g}, fitted on the validation images "
            f"(`config.json` keeps it; predictions use it): expected calibration error {panels[0][2]:.3f} -> "
            f"{panels[1][2]:.3f}{nll}. Bars under the diagonal are over-confident bins. The right panel is scored "
            "on the images T was fitted on, so it is optimistic.", Image("reliability.png")]


# --- rendering -------------------------------------------------------------------------------------------------
def _markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out += ["#" * block.level + " " + block.text]
        elif isinstance(block, list):
            out += [f"- {item}" for item in block]
        elif isinstance(block, Table):
            out += [_md_row(block.header), "|" + "---|" * len(block.header), *(_md_row(r) for r in block.rows)]
        elif isinstance(block, Image):
            out += [f"![{block.name}]({block.name})"]
        elif isinstance(block, Code):
            out += ["```toml", block.text, "```"]
        else:
            out += [block]
        out.append("")
    return "\n".join(out)


def _md_row(cells: tuple[str, ...]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


STYLE = ("body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;line-height:1.45}"
         "table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:2px 8px;text-align:left}"
         "img{max-width:100%;height:auto}pre{background:#f5f5f5;padding:.6em;overflow-x:auto}code{background:#f2f2f2}")


def _html(title: str, blocks: list[Block], run_dir: Path) -> str:
    body = [f"<h1>{_inline(title)}</h1>"]
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{_inline(block.text)}</h{block.level}>")
        elif isinstance(block, list):
            body.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in block) + "</ul>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{_inline(c)}</th>" for c in block.header)
            rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(block, Image):  # inlined: the file stands alone
            data = base64.b64encode((run_dir / block.name).read_bytes()).decode()
            body.append(f'<p><img alt="{block.name}" src="data:image/png;base64,{data}"></p>')
        elif isinstance(block, Code):
            body.append(f"<pre>{html.escape(block.text)}</pre>")
        else:
            body.append(f"<p>{_inline(block)}</p>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def _inline(text: str) -> str:
    """The markdown of a line (`code`, **bold**) as HTML."""
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)

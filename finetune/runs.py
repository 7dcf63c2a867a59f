"""The run folder: what a fit writes, and how its model is read back without the code that made it.

    runs/<name>/
      recipe.toml         the resolved recipe, every override applied
      lr_find.png         with lr=auto: lr-find's sweep (and lr_find.csv, lr_find.json; phases/lr_find.py)
      classes.json        label names, index order
      split.json          the exact train/val(/test) file lists (reuse with --split)
      metrics.csv         per-step and per-epoch metrics (Lightning CSV logger)
      checkpoints/        best.ckpt (on val/acc) and last.ckpt
      model.safetensors   trained weights of the best epoch, timm key names
      config.json         timm hub layout: architecture, num_classes, label_names, pretrained_cfg (+ finetune,
                          whose "format" is FORMAT_VERSION: the layout of this folder and its export)
      summary.json        final metrics, timings, skipped files, versions, recipe choice
      val_predictions.npz the kept model's validation logits, labels and image files (what the report reads)
      report.md           the run for people (finetune/report.py), with its plots: curves.png, lr.png,
      report.html         probe.png, confusion.png, per_class.png, wrong.png, reliability.png; the HTML
                          holds them inline
"""

from __future__ import annotations

import csv
import io
import json
import logging
import platform
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import safetensors.torch
import timm
import torch

from . import __version__
from .data import DatasetSplits
from .errors import FinetuneError, UsageError
from .files import atomic_write_bytes, atomic_write_json
from .formats import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME  # noqa: F401
from .model.classifier import Classifier, Member
from .model.domain import DomainGap
from .phases.outcome import Outcome
from .plots import plot_probe_sweep
from .recipes import Recipe
from .runtime import Precision

log = logging.getLogger("finetune")

MEMBER_PREFIX = "finetune_members."  # the weights of an ensemble's backbones after the first


class FormatVersionError(FinetuneError):
    """A run or export folder written by a newer finetune, in a format this one cannot read."""


def new_run_dir(out: str | Path | None, dataset: Path, recipe: str) -> Path:
    """``out`` as given (it may exist only if empty), else ``runs/<dataset>-<recipe>[-N]``."""
    if out is not None:
        out = Path(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UsageError(f"--out {out}: already exists and is not an empty folder; choose another --out "
                             "or remove it")
        out.mkdir(parents=True, exist_ok=True)
        return out
    base = Path("runs") / f"{dataset.resolve().name}-{recipe}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    candidate.mkdir(parents=True)
    return candidate


def write_json(path: Path, data: Any) -> None:
    atomic_write_json(path, data)


def model_config(classifier: Classifier, architecture: str, labels: list[str], data_config: dict,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """timm's hub ``config.json``: plain timm reads architecture/num_classes/pretrained_cfg."""
    pretrained_cfg = dict(data_config)
    pretrained_cfg["input_size"] = list(pretrained_cfg["input_size"])
    pretrained_cfg["mean"] = list(pretrained_cfg["mean"])
    pretrained_cfg["std"] = list(pretrained_cfg["std"])
    pretrained_cfg["num_classes"] = classifier.num_classes
    pretrained_cfg["classifier"] = getattr(classifier.backbone, "pretrained_cfg", {}).get("classifier", "classifier")
    # test_flip: the model averages each image's logits with its mirror image's; plain timm does not
    finetune: dict[str, Any] = {"format": FORMAT_VERSION, "head": classifier.head_kind,
                                "test_flip": classifier.test_flip}
    if classifier.multistage is not None:
        finetune["head_stages"] = classifier.head_stages
        finetune["head_in_features"] = classifier.multistage.in_features
    if classifier.members:  # an ensemble: the backbones after the first, their weights under finetune_members.<i>.
        finetune["ensemble"] = [m.to_config() for m in classifier.members]
    finetune.update(extra or {})
    return {
        "architecture": architecture,
        "num_classes": classifier.num_classes,
        "num_features": classifier.backbone.num_features,
        "label_names": list(labels),
        "pretrained_cfg": pretrained_cfg,
        "finetune": finetune,
    }


def export_state_dict(classifier: Classifier) -> dict[str, torch.Tensor]:
    """Weights under timm's own key names; a multi-stage head adds ``finetune_head.*`` keys."""
    state = {k: v for k, v in classifier.backbone.state_dict().items()}
    if classifier.multistage is not None:
        state.update({f"finetune_head.{k}": v for k, v in classifier.multistage.state_dict().items()})
    for i, member in enumerate(classifier.members):
        state.update({f"{MEMBER_PREFIX}{i}.{k}": v for k, v in member.backbone.state_dict().items()})
    # safetensors wants dense, contiguous tensors; channels_last weights are neither in the default layout
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def save_model(folder: Path, classifier: Classifier, config: dict[str, Any]) -> None:
    weights = safetensors.torch.save(export_state_dict(classifier), metadata={"format": "pt"})
    atomic_write_bytes(folder / WEIGHTS_NAME, weights)
    write_json(folder / CONFIG_NAME, config)


def load_model(folder: str | Path) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the classifier from ``model.safetensors`` + ``config.json`` alone (no code from the files)."""
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: point at a run folder written by `finetune fit`")
    config = check_format(json.loads(config_path.read_text()), config_path)
    extra = config.get("finetune", {})
    backbone = timm.create_model(config["architecture"], pretrained=False, num_classes=config["num_classes"],
                                 pretrained_cfg_overlay=data_config(config))
    cfg = data_config(config)
    members = [Member(timm.create_model(m["architecture"], pretrained=False, num_classes=0), m["architecture"],
                      m["head_stages"], m["mean"], m["std"], cfg["mean"], cfg["std"])
               for m in extra.get("ensemble", [])]
    head = extra.get("head", "linear")
    classifier = Classifier(backbone, config["num_classes"], head=head, members=members,
                            head_stages=len(extra["head_stages"]) if head == "multistage" else 3)
    classifier.test_flip = bool(extra.get("test_flip", False))  # folders written before it: no averaging
    state = safetensors.torch.load_file(str(folder / WEIGHTS_NAME))
    head_state = {k.removeprefix("finetune_head."): v for k, v in state.items() if k.startswith("finetune_head.")}
    body = {k: v for k, v in state.items() if not k.startswith(("finetune_head.", MEMBER_PREFIX))}
    classifier.backbone.load_state_dict(body, strict=True)
    if classifier.multistage is not None:
        classifier.multistage.load_state_dict(head_state, strict=True)
    for i, member in enumerate(classifier.members):
        prefix = f"{MEMBER_PREFIX}{i}."
        member.backbone.load_state_dict({k.removeprefix(prefix): v for k, v in state.items()
                                         if k.startswith(prefix)}, strict=True)
    return classifier.eval(), config


def check_format(config: dict[str, Any], source: str | Path) -> dict[str, Any]:
    """``config`` (read from ``source``) with its format version, after checking that this code reads it.

    A config without a version was written before versions existed, in the layout of version 1: it gets
    ``FORMAT_VERSION``, so that an export or a rewrite of it records the layout it has.
    """
    extra = config.setdefault("finetune", {})
    version = extra.setdefault("format", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise FormatVersionError(f"{source} has format version {version!r}, which no finetune writes: the file "
                                 f"is damaged; restore it, or set finetune.format to {FORMAT_VERSION} if the rest "
                                 "is intact")
    if version > FORMAT_VERSION:
        raise FormatVersionError(f"{source} has format version {version}; this finetune ({__version__}) reads "
                                 f"versions up to {FORMAT_VERSION}: upgrade finetune to read it")
    return config


def data_config(config: dict[str, Any]) -> dict[str, Any]:
    """The timm data config (input_size, mean, std, interpolation, crop_pct, crop_mode) of a ``config.json``."""
    cfg = config.get("pretrained_cfg", {})
    keys = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
    return {k: tuple(cfg[k]) if isinstance(cfg[k], list) else cfg[k] for k in keys if k in cfg}


def temperature(config: dict[str, Any]) -> float:
    """The calibration temperature of a ``config.json`` (``finetune.temperature``); 1.0 when none was fitted."""
    return float(config.get("finetune", {}).get("temperature", 1.0))


def write_temperature(folder: str | Path, value: float) -> None:
    """Store a fitted temperature in ``folder/config.json`` (atomically); predictions divide logits by it."""
    path = Path(folder) / CONFIG_NAME
    config = check_format(json.loads(path.read_text()), path)
    config["finetune"]["temperature"] = float(value)
    write_json(path, config)


def read_epoch_metrics(metrics_csv: Path) -> list[dict[str, float]]:
    """One row per epoch, merging Lightning's separate train/val rows; ``step``: the last step of the epoch."""
    if not metrics_csv.is_file():
        return []
    epochs: dict[int, dict[str, float]] = {}
    with metrics_csv.open() as f:
        for row in csv.DictReader(f):
            if not row.get("epoch"):
                continue
            entry = epochs.setdefault(int(float(row["epoch"])), {})
            if row.get("step"):
                entry["step"] = max(entry.get("step", 0.0), float(row["step"]))
            for key, value in row.items():
                # epoch-level values: "_epoch" keys, and keys logged only per epoch (train/acc, val/..., val_ema/...)
                epoch_level = key.endswith("_epoch") or (key.startswith(("train/", "val/", "val_ema/"))
                                                         and not key.endswith("_step"))
                if value not in ("", None) and epoch_level:
                    entry[key.removesuffix("_epoch")] = float(value)
    return [dict(epoch=e, **m) for e, m in sorted(epochs.items())]


def read_step_metrics(metrics_csv: Path, prefix: str) -> dict[str, list[tuple[int, float]]]:
    """Per-step values of the ``metrics.csv`` columns that start with ``prefix`` (e.g. ``"lr/"``), by column
    name without it: (step, value) in step order."""
    if not metrics_csv.is_file():
        return {}
    series: dict[str, list[tuple[int, float]]] = {}
    with metrics_csv.open() as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key and key.startswith(prefix) and value not in ("", None):
                    series.setdefault(key.removeprefix(prefix), []).append((int(float(row["step"])), float(value)))
    return {k: sorted(v) for k, v in series.items()}


VAL_PREDICTIONS = "val_predictions.npz"


@dataclass
class ValPredictions:
    """The kept model's validation logits (before temperature scaling), labels and image files: what the run
    report draws, without the model. ``files`` are relative to ``root`` (the data folder), in the rows' order;
    empty when they are not known."""

    logits: np.ndarray  # (N, C) float32
    labels: np.ndarray  # (N,) class indices
    files: list[str]
    root: Path


def write_val_predictions(folder: Path, logits: torch.Tensor, labels: torch.Tensor, files: list[str] | None,
                          splits: DatasetSplits) -> None:
    """``val_predictions.npz``. ``files`` (one per row) are kept only when they hold the rows' labels in
    ``splits``: a check that they are the images the logits came from."""
    label_of = {str(s.path): s.label for s in splits.val}
    labels = labels.detach().cpu().long()
    if files is None or len(files) != len(labels) or [label_of.get(f) for f in files] != labels.tolist():
        log.warning("the validation images of the predictions are not known: the report shows no image grid")
        files = []
    relative = [_relative(Path(f), splits.root) for f in files]
    buffer = io.BytesIO()
    np.savez_compressed(buffer, logits=logits.detach().cpu().float().numpy(), labels=labels.numpy(),
                        files=np.array(relative, dtype=str), root=np.array(str(splits.root)))
    atomic_write_bytes(folder / VAL_PREDICTIONS, buffer.getvalue())


def read_val_predictions(folder: Path) -> ValPredictions | None:
    """``folder/val_predictions.npz``, or None in a run folder written before it existed."""
    path = folder / VAL_PREDICTIONS
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        return ValPredictions(data["logits"], data["labels"], [str(f) for f in data["files"]], Path(str(data["root"])))


def _relative(path: Path, root: Path) -> str:
    try:
        return PurePosixPath(path.relative_to(root)).as_posix()
    except ValueError:  # a labels CSV may name files outside the folder
        return str(path)


def build_summary(*, data_dir: Path, run_dir: Path, recipe: Recipe, reason: str, gap: DomainGap | None,
                  splits: DatasetSplits, precision: Precision, engine: dict[str, str], outcome: Outcome,
                  calibration: dict[str, Any], exported: dict[str, Any] | None, probe: dict[str, Any] | None,
                  preflight: dict[str, Any], balance: dict[str, Any], timings: dict[str, float], skipped: list[str],
                  trainable: dict[str, int], resolution: dict[str, Any],
                  decoded_cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """``summary.json``: what ran, why, and how well, with the headline on held-out data when there is any."""
    headline = "test" if outcome.test else "val"
    return {
        "run_dir": str(run_dir), "data_dir": str(data_dir), "recipe": recipe.name, "recipe_reason": reason,
        "domain_gap": None if gap is None else {"score": gap.score, "threshold": gap.threshold,
                                                "domain": gap.domain, "images": gap.images},
        "model": recipe.model, "num_classes": len(splits.classes), "classes": splits.classes,
        "train_images": len(splits.train), "val_images": len(splits.val), "test_images": len(splits.test),
        "split_source": splits.split_source, "images_per_class": len(splits.train) / len(splits.classes),
        "precision": precision.lightning, "precision_reason": precision.reason, "feature_backend": engine,
        "training": outcome.training, "selection": outcome.selection, "epochs_run": outcome.epochs_run,
        "best_epoch": outcome.best_epoch, "kept": outcome.kept,
        "headline": {"split": headline, **(outcome.test or outcome.val)},
        "val": outcome.val, "test": outcome.test, "calibration": calibration, "export": exported, "probe": probe,
        "skipped_files": len(skipped), "skipped": skipped, "preflight": preflight, "balance": balance,
        "timings": timings, "train_images_per_s": outcome.train_images_per_s, "trainable_parameters": trainable,
        "processes": outcome.processes, "resolution": resolution, "decoded_cache": decoded_cache,
        "frozen_cache": outcome.frozen_cache, "ema": outcome.ema, "lr_find": outcome.lr_find,
        "inference": inference(recipe),
        "versions": versions(),
    }


def inference(recipe: Recipe) -> dict[str, Any]:
    """What one prediction of the kept model costs: its views of the image and the backbones each runs through."""
    views = ["image", "mirror image"] if recipe.test_flip else ["image"]
    backbones = [recipe.model, *recipe.ensemble_members]
    return {"views": views, "backbones": backbones, "backbone_passes_per_image": len(views) * len(backbones)}


def versions() -> dict[str, str]:
    import albumentations
    import pytorch_lightning as pl
    import torchmetrics

    from . import __version__

    return {"finetune": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "pytorch_lightning": pl.__version__,
            "torchmetrics": torchmetrics.__version__, "albumentations": albumentations.__version__}


def save_checkpoint(folder: Path, state_dict: dict[str, torch.Tensor], extra: dict[str, Any],
                    names: tuple[str, ...] = ("best.ckpt", "last.ckpt")) -> None:
    """``best.ckpt`` and ``last.ckpt`` (or ``names``) for a run without Lightning epochs (a probe), or the
    probe of an LP-FT run that beat every fine-tuned epoch: the same ``state_dict`` layout as Lightning's
    checkpoints, readable with ``torch.load(weights_only=True)``."""
    import io

    buffer = io.BytesIO()
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}, "epoch": 0,
                "global_step": 0, "finetune": extra}, buffer)
    for name in names:
        atomic_write_bytes(folder / name, buffer.getvalue())


def write_probe_sweep(folder: Path, sweep: list[dict[str, float]]) -> None:
    """``probe.csv`` (one row per weight decay tried) and its plot, ``probe.png`` (``curves.png`` is the
    plot of the epochs, when a run has epochs)."""
    lines = [",".join(sweep[0])] + [",".join(f"{v:g}" for v in row.values()) for row in sweep]
    atomic_write_bytes(folder / "probe.csv", ("\n".join(lines) + "\n").encode())
    plot_probe_sweep(sweep, folder / "probe.png")


def write_final_metrics(path: Path, metrics: dict[str, float]) -> None:
    """A one-row ``metrics.csv`` for a run whose head was fitted without epochs (the probe)."""
    row = {"epoch": 0, "step": 0, **{f"val/{k}": v for k, v in metrics.items()}}
    text = ",".join(row) + "\n" + ",".join(f"{v:g}" for v in row.values()) + "\n"
    atomic_write_bytes(path, text.encode())

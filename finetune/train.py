"""fit(): the one place that wires data -> backbone -> classifier -> LightningModule -> callbacks -> Trainer."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import platform
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import timm
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar, Timer
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger

from . import __version__, recipes, runs
from .data import ImageFolderDataModule, scan_image_folder
from .model.backbones import create_backbone
from .model.classifier import Classifier
from .model.freezing import StagedFinetuning
from .model.module import OptimConfig, TransferModule
from .recipes import Recipe
from .runtime import choose_precision, tune_allocator

log = logging.getLogger("finetune")

MONITOR = "val/acc"


@dataclass
class FitResult:
    run_dir: Path
    recipe: Recipe
    metrics: dict[str, float]  # best-checkpoint validation metrics
    summary: dict[str, Any] = field(repr=False)

    @property
    def accuracy(self) -> float:
        return self.metrics["acc"]


def resolve_recipe(
    recipe: str | Path | Recipe,
    images_per_class: float,
    domain: str = "similar",
    overrides: Mapping[str, Any] | None = None,
) -> tuple[Recipe, str]:
    """The recipe to run and why: ``"auto"`` picks one of the four cases by data size and domain."""
    if isinstance(recipe, Recipe):
        chosen, reason = recipe, "given as a Recipe object"
    elif str(recipe) == "auto":
        name, reason = recipes.choose(images_per_class, domain)
        chosen = recipes.get(name)
    else:
        chosen, reason = recipes.get(recipe), "chosen by the user"
    if overrides:
        chosen = chosen.override(overrides)
        reason += "; overrides: " + ", ".join(f"{k}={v}" for k, v in overrides.items())
    return chosen, reason


def fit(
    data_dir: str | Path,
    recipe: str | Path | Recipe = "auto",
    *,
    model: str | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    domain: str = "similar",
    out: str | Path | None = None,
    split_file: str | Path | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    precision: str = "auto",
    weights: str | Path | None = None,
    pretrained: bool | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    limit_batches: int | float | None = None,
) -> FitResult:
    """Fine-tune a pretrained backbone on an image folder; write a self-describing run folder.

    ``overrides`` are recipe fields (``{"lr": 3e-4}``); ``model``, ``epochs``, ``batch_size`` and
    ``pretrained`` are shortcuts for the same. ``limit_batches`` caps batches per epoch (smoke tests).
    """
    started = time.perf_counter()
    tune_allocator()
    data_dir = Path(data_dir)
    splits = scan_image_folder(data_dir, val_fraction=val_fraction, seed=seed, split_file=split_file)
    images_per_class = len(splits.train) / len(splits.classes)
    shortcuts = {"model": model, "epochs": epochs, "batch_size": batch_size, "pretrained": pretrained}
    merged = {k: v for k, v in shortcuts.items() if v is not None} | dict(overrides or {})
    chosen, reason = resolve_recipe(recipe, images_per_class, domain, merged)
    log.info("recipe %s: %s", chosen.name, reason)

    pl.seed_everything(seed, workers=True, verbose=False)
    backbone_kwargs = {"drop_path_rate": chosen.drop_path} if chosen.drop_path else {}
    backbone = create_backbone(chosen.model, pretrained=chosen.pretrained, num_classes=len(splits.classes),
                               weights=weights, **backbone_kwargs)
    data_config = timm.data.resolve_model_data_config(backbone)
    classifier = Classifier(backbone, len(splits.classes), head=chosen.head, head_stages=chosen.head_stages,
                            head_dropout=chosen.head_dropout)
    prec = choose_precision(precision)
    if prec.channels_last:
        classifier = classifier.to(memory_format=torch.channels_last)
    module = TransferModule(classifier, _optim_config(chosen), channels_last=prec.channels_last)
    datamodule = ImageFolderDataModule(
        splits, data_config, batch_size=chosen.batch_size, num_workers=num_workers, seed=seed,
        augment={"scale_min": chosen.scale_min, "hflip": chosen.hflip, "color_jitter": chosen.color_jitter},
    )

    run_dir = runs.new_run_dir(out, data_dir, chosen.name)
    log.info("run folder %s", run_dir)
    (run_dir / "recipe.toml").write_text(f"# resolved recipe: {reason}\n" + chosen.to_toml())
    runs.write_json(run_dir / "classes.json", splits.classes)
    splits.save(run_dir / "split.json")

    timer = Timer()
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor=MONITOR, mode="max",
                                 save_last=True, save_weights_only=False, enable_version_counter=False)
    callbacks: list[pl.Callback] = [StagedFinetuning(chosen.freeze_epochs, chosen.unfreeze_stages), checkpoint, timer]
    if chosen.early_stopping:
        callbacks.append(EarlyStopping(MONITOR, mode="max", patience=chosen.early_stopping))
    if progress:
        callbacks.append(RichProgressBar(leave=True))
    trainer = pl.Trainer(
        max_epochs=chosen.epochs,
        accelerator="auto",
        devices=1,
        precision=prec.lightning,
        logger=_loggers(run_dir),
        callbacks=callbacks,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=5,
        limit_train_batches=limit_batches,
        limit_val_batches=limit_batches,
        deterministic=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*Checkpoint directory.*exists and is not empty.*")
        warnings.filterwarnings("ignore", ".*Experiment logs directory.*")  # ours: it holds recipe.toml etc.
        warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")  # frozen parts, on purpose
        warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
        trainer.fit(module, datamodule=datamodule)
        _load_best(module, checkpoint)
        val = _strip(trainer.validate(module, datamodule=datamodule, verbose=False)[0], "val/")
        test = {}
        if splits.test:
            test = _strip(trainer.test(module, datamodule=datamodule, verbose=False)[0], "test/")

    labels = splits.classes
    config = runs.model_config(classifier, chosen.model, labels, data_config,
                               extra={"recipe": chosen.name, "version": __version__})
    runs.save_model(run_dir, classifier, config)
    rows = runs.read_epoch_metrics(run_dir / "metrics.csv")
    runs.plot_curves(rows, run_dir / "curves.png")
    train_s = timer.time_elapsed("train")
    trained_images = _trained_images(rows, len(splits.train), trainer.current_epoch, limit_batches, chosen.batch_size)
    summary = {
        "run_dir": str(run_dir),
        "data_dir": str(data_dir),
        "recipe": chosen.name,
        "recipe_reason": reason,
        "model": chosen.model,
        "num_classes": len(labels),
        "classes": labels,
        "train_images": len(splits.train),
        "val_images": len(splits.val),
        "test_images": len(splits.test),
        "split_source": splits.split_source,
        "images_per_class": images_per_class,
        "precision": prec.lightning,
        "precision_reason": prec.reason,
        "epochs_run": trainer.current_epoch,
        "best_epoch": _best_epoch(rows),
        "val": val,
        "test": test,
        "skipped_files": len(module.skipped_files),
        "skipped": sorted(module.skipped_files),
        "timings": {"total_s": time.perf_counter() - started, "train_s": train_s,
                    "validate_s": timer.time_elapsed("validate")},
        "train_images_per_s": trained_images / train_s if train_s else math.nan,
        "trainable_parameters": module.trainable_summary(),
        "versions": _versions(),
    }
    runs.write_json(run_dir / "summary.json", summary)
    runs.write_report(run_dir / "report.md", summary)
    if module.skipped_files:
        log.warning("skipped %d unreadable file(s): %s", len(module.skipped_files),
                    ", ".join(sorted(module.skipped_files)[:10]))
    return FitResult(run_dir=run_dir, recipe=chosen, metrics=val, summary=summary)


def _loggers(run_dir: Path) -> list[Logger]:
    """metrics.csv always; TensorBoard event files too when tensorboard is installed."""
    loggers: list[Logger] = [CSVLogger(run_dir, name="", version="")]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version=""))
    return loggers


def _optim_config(r: Recipe) -> OptimConfig:
    names = {f.name for f in dataclasses.fields(OptimConfig)}
    return OptimConfig(**{k: v for k, v in r.to_dict().items() if k in names})


def _load_best(module: TransferModule, checkpoint: ModelCheckpoint) -> None:
    path = checkpoint.best_model_path
    if not path:
        return
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)


def _strip(metrics: Mapping[str, float], prefix: str) -> dict[str, float]:
    return {k.removeprefix(prefix): float(v) for k, v in metrics.items() if k.startswith(prefix)}


def _best_epoch(rows: list[dict[str, float]]) -> int | None:
    scored = [r for r in rows if MONITOR in r]
    return int(max(scored, key=lambda r: r[MONITOR])["epoch"]) if scored else None


def _trained_images(rows, n_train: int, epochs: int, limit, batch_size: int) -> int:
    if isinstance(limit, int):
        return min(n_train, limit * batch_size) * epochs
    return n_train * epochs


def _versions() -> dict[str, str]:
    import albumentations
    import torchmetrics

    return {"finetune": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "pytorch_lightning": pl.__version__,
            "torchmetrics": torchmetrics.__version__, "albumentations": albumentations.__version__}


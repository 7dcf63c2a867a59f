"""The epochs phase: Lightning trains the model (the backbone's unfrozen stages and the head), keeps the best
epoch on validation accuracy, and scores it on the validation and test splits."""

from __future__ import annotations

import importlib.util
import logging
import math
import warnings
from collections.abc import Mapping
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar, Timer
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger

from .. import runs
from ..data import ImageFolderDataModule
from ..device import Device
from ..model.freezing import StagedFinetuning
from ..model.module import TransferModule
from ..plots import plot_curves
from ..recipes import Recipe
from ..runtime import Precision
from .outcome import Outcome

log = logging.getLogger("finetune")

MONITOR = "val/acc"
# Lightning warnings that say what this phase does on purpose
_EXPECTED_WARNINGS = (".*does not have many workers.*", ".*Checkpoint directory.*exists and is not empty.*",
                      ".*Experiment logs directory.*",  # ours: it already holds recipe.toml and split.json
                      ".*module\\(s\\) in eval mode.*",  # frozen parts
                      ".*smaller than the logging interval.*")


def train_epochs(module: TransferModule, datamodule: ImageFolderDataModule, recipe: Recipe, *,
                 device: Device, precision: Precision, run_dir: Path, epochs: int, probed: bool, progress: bool,
                 limit_batches: int | float | None = None) -> Outcome:
    """``epochs`` Lightning epochs: all of the recipe's, or after a probe the fine-tuning epochs only (LP-FT)."""
    timer = Timer()
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor=MONITOR, mode="max",
                                 save_last=True, enable_version_counter=False)
    callbacks: list[pl.Callback] = [StagedFinetuning(0 if probed else recipe.freeze_epochs, recipe.unfreeze_stages),
                                    checkpoint, timer]
    if recipe.early_stopping:
        callbacks.append(EarlyStopping(MONITOR, mode="max", patience=recipe.early_stopping))
    if progress:
        callbacks.append(RichProgressBar(leave=True))
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator=device.accelerator, devices=1, precision=precision.lightning,
        logger=_loggers(run_dir),
        callbacks=callbacks, enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
        log_every_n_steps=5, limit_train_batches=limit_batches, limit_val_batches=limit_batches,
    )
    with warnings.catch_warnings():
        for message in _EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message)
        trainer.fit(module, datamodule=datamodule)
        _load_best(module, checkpoint)
        module.collect_outputs, module.outputs = True, []
        val = _strip(trainer.validate(module, datamodule=datamodule, verbose=False)[0], "val/")
        logits, labels = (torch.cat([o[i] for o in module.outputs]) for i in (0, 1))
        module.collect_outputs = False
        test = _strip(trainer.test(module, datamodule=datamodule, verbose=False)[0], "test/") \
            if datamodule.has_test else {}
    rows = runs.read_epoch_metrics(run_dir / "metrics.csv")
    plot_curves(rows, run_dir / "curves.png")
    train_s = timer.time_elapsed("train")
    images = _trained_images(len(datamodule.splits.train), trainer.current_epoch, limit_batches, recipe.batch_size)
    best = _best_epoch(rows)
    if not progress:
        log.info("%d epoch(s) in %.1f s; best epoch %s, val acc %.4f", trainer.current_epoch, train_s,
                 "n/a" if best is None else best + 1, val.get("acc", math.nan))
    return Outcome(
        training=("LP-FT: probed head, then " if probed else "") + f"{trainer.current_epoch} epoch(s) with Lightning",
        selection=f"epoch {'n/a' if best is None else best + 1} of {trainer.current_epoch}, best on validation "
                  "accuracy",
        val=val, test=test, val_logits=logits, val_labels=labels, epochs_run=trainer.current_epoch,
        best_epoch=best, timings={"train_s": train_s, "validate_s": timer.time_elapsed("validate")},
        train_images_per_s=images / train_s if train_s else math.nan, skipped=set(module.skipped_files))


def _loggers(run_dir: Path) -> list[Logger]:
    """metrics.csv always; TensorBoard event files too when tensorboard is installed."""
    loggers: list[Logger] = [CSVLogger(run_dir, name="", version="")]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version=""))
    return loggers


def _load_best(module: TransferModule, checkpoint: ModelCheckpoint) -> None:
    if checkpoint.best_model_path:
        state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)


def _strip(metrics: Mapping[str, float], prefix: str) -> dict[str, float]:
    return {k.removeprefix(prefix): float(v) for k, v in metrics.items() if k.startswith(prefix)}


def _best_epoch(rows: list[dict[str, float]]) -> int | None:
    scored = [r for r in rows if MONITOR in r]
    return int(max(scored, key=lambda r: r[MONITOR])["epoch"]) if scored else None


def _trained_images(n_train: int, epochs: int, limit: int | float | None, batch_size: int) -> int:
    if isinstance(limit, int):
        return min(n_train, limit * batch_size) * epochs
    return n_train * epochs

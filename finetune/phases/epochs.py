"""The epochs phase: Lightning trains the model (the backbone's unfrozen stages and the head), keeps the best
epoch on validation accuracy, and scores it on the validation and test splits."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar, Timer
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger
from pytorch_lightning.strategies import DDPStrategy, Strategy

from .. import runs
from ..data import ImageFolderDataModule, Sample
from ..device import Device
from ..distributed import Ranks
from ..files import atomic_write_text
from ..model.batchnorm import SyncBatchNorm
from ..model.depthwise import small_map_backward
from ..model.freezing import StagedFinetuning
from ..model.guard import DivergenceGuard, TrainingSignals
from ..model.module import TransferModule
from ..recipes import Recipe
from ..runtime import Precision
from .outcome import Outcome
from .resume import ResumePoint, SaveAndStop

log = logging.getLogger("finetune")

MONITOR = "val/acc"
EMA_MONITOR = "val/kept_acc"  # with a moving average of the weights: the better of it and the raw weights
# Lightning warnings that say what this phase does on purpose
_EXPECTED_WARNINGS = (".*does not have many workers.*", ".*Checkpoint directory.*exists and is not empty.*",
                      ".*Experiment logs directory.*",  # ours: it already holds recipe.toml and split.json
                      ".*module\\(s\\) in eval mode.*",  # frozen parts
                      ".*smaller than the logging interval.*",
                      ".*resuming from a checkpoint that ended before the epoch ended.*")  # EpochSampler resumes


def train_epochs(module: TransferModule, datamodule: ImageFolderDataModule, recipe: Recipe, *,
                 device: Device, precision: Precision, run_dir: Path, epochs: int, probed: bool, progress: bool,
                 limit_batches: int | float | None = None, ranks: Ranks | None = None,
                 checkpoint_every: int | None = None, resume: ResumePoint | None = None,
                 callbacks: Sequence[pl.Callback] = ()) -> Outcome:
    """``epochs`` Lightning epochs: all of the recipe's, or after a probe the fine-tuning epochs only (LP-FT).
    ``ranks``: the processes of a multi-device run (``finetune.distributed.launch``). ``resume``: continue
    from that checkpoint of this run. ``callbacks`` run after the toolkit's own."""
    ranks = ranks or Ranks()
    timer = Timer()
    monitor = EMA_MONITOR if module.ema is not None else MONITOR
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor=monitor, mode="max",
                                 enable_version_counter=False)  # last.ckpt: SaveAndStop, after every epoch
    staged = StagedFinetuning(0 if probed else recipe.freeze_epochs, recipe.unfreeze_stages)
    # the guard first: when it stops the run, no later callback saves the diverged steps
    callbacks: list[pl.Callback] = [DivergenceGuard(module.classifier.num_classes, recipe.divergence_factor),
                                    TrainingSignals(), staged, checkpoint, timer,
                                    SaveAndStop(run_dir, ranks, checkpoint_every), *callbacks]
    if recipe.early_stopping:
        callbacks.append(EarlyStopping(monitor, mode="max", patience=recipe.early_stopping))
    if progress and ranks.main:
        callbacks.append(RichProgressBar(leave=True))
    sync_bn = ranks.distributed and recipe.sync_batchnorm and recipe.trains_backbone
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator=device.accelerator, devices=ranks.devices, num_nodes=ranks.num_nodes,
        strategy=_strategy(ranks, staged.changes_phase(epochs)),
        plugins=[SyncBatchNorm(cuda=device.kind == "cuda")] if sync_bn else None,
        use_distributed_sampler=False,  # the EpochSampler shards the training set; every rank scores all of val
        precision=precision.lightning, logger=_loggers(run_dir),
        callbacks=callbacks, enable_progress_bar=progress and ranks.main, enable_model_summary=False,
        num_sanity_val_steps=0, log_every_n_steps=5, limit_train_batches=limit_batches,
        gradient_clip_val=recipe.gradient_clip or None,
        limit_val_batches=limit_batches,
    )
    if resume is not None:
        datamodule.train_sampler.resume(resume.epoch, resume.batches_done * datamodule.batch_size)
    with warnings.catch_warnings():
        for message in _EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message)
        # PyTorch's CPU backward of depthwise layers on tiny maps is slow (finetune/model/depthwise.py)
        earlier = _metrics_before(run_dir, resume) if ranks.main else []
        with small_map_backward(module.classifier, cpu=device.kind == "cpu"):
            trainer.fit(module, datamodule=datamodule, ckpt_path=None if resume is None else resume.path)
        if earlier:
            _put_back(run_dir / "metrics.csv", earlier)
        processes = {"strategy": type(trainer.strategy).__name__, "global_batch": recipe.batch_size * ranks.world,
                     "final_weights_sha256": ranks.gather(_digest(module))}
        _load_best(module, checkpoint, ranks)
        rows = runs.read_epoch_metrics(run_dir / "metrics.csv") if ranks.main else []
        best = _best_epoch(rows, monitor)
        ema = _keep_ema_or_raw(module, rows, best, ranks) if module.ema is not None else None
        module.collect_outputs, module.outputs = True, []
        val = _strip(trainer.validate(module, datamodule=datamodule, verbose=False)[0], "val/")
        logits, labels = (torch.cat([o[i] for o in module.outputs]) for i in (0, 1))
        module.collect_outputs = False
        test = _strip(trainer.test(module, datamodule=datamodule, verbose=False)[0], "test/") \
            if datamodule.has_test else {}
    train_s = timer.time_elapsed("train")
    images = _trained_images(len(datamodule.splits.train), trainer.current_epoch, limit_batches, recipe.batch_size)
    if not progress:
        log.info("%d epoch(s) in %.1f s; best epoch %s, val acc %.4f", trainer.current_epoch, train_s,
                 "n/a" if best is None else best + 1, val.get("acc", math.nan))
    return Outcome(
        training=("LP-FT: probed head, then " if probed else "") + f"{trainer.current_epoch} epoch(s) with Lightning",
        selection=f"epoch {'n/a' if best is None else best + 1} of {trainer.current_epoch}, best on validation "
                  "accuracy" + (f", {ema['sentence']}" if ema else ""),
        val=val, test=test, val_logits=logits, val_labels=labels,
        val_files=_val_files(datamodule.splits.val, module.skipped_files, len(labels)),
        epochs_run=trainer.current_epoch,
        best_epoch=best, timings={"train_s": train_s, "validate_s": timer.time_elapsed("validate")},
        train_images_per_s=images / train_s if train_s else math.nan, skipped=set(module.skipped_files),
        processes=processes, ema=ema)


def _keep_ema_or_raw(module: TransferModule, rows: list[dict[str, float]], best: int | None,
                     ranks: Ranks) -> dict[str, Any]:
    """At the best epoch, the moving average's validation accuracy against the raw weights' (read on rank 0,
    sent to all); the better one becomes the model's weights (ties keep the raw ones)."""
    row = next((r for r in rows if r.get("epoch") == best and EMA_MONITOR in r), None) if ranks.main else None
    scores = ranks.broadcast(None if row is None else (row[MONITOR], row["val_ema/acc"]))
    if scores is None:
        return {"kept": "raw", "sentence": "raw weights kept (no moving-average score)"}
    raw, averaged = scores
    kept = "ema" if averaged > raw else "raw"
    if kept == "ema":
        module.keep_ema_weights()
    name = {"ema": "moving-average (EMA) weights", "raw": "raw weights"}[kept]
    return {"kept": kept, "decay": module.recipe.ema_decay, "val_acc_raw": raw, "val_acc_ema": averaged,
            "sentence": f"{name} kept (val acc {max(raw, averaged):.4f}; raw {raw:.4f}, EMA {averaged:.4f})"}


def _metrics_before(run_dir: Path, resume: ResumePoint | None) -> list[dict[str, str]]:
    """The rows of ``metrics.csv`` an interrupted run logged before its checkpoint. Lightning's CSVLogger deletes
    the file when it starts; without them a resumed run would pick its best epoch (and EMA or raw weights) among
    the epochs after the resume only. Rows logged after the checkpoint are logged again by the resumed run."""
    path = run_dir / "metrics.csv"
    if resume is None or not path.is_file():
        return []
    with path.open(newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("step") and int(row["step"]) < resume.global_step]


def _put_back(path: Path, earlier: list[dict[str, str]]) -> None:
    """``earlier`` rows, then the resumed run's, under one header."""
    later = list(csv.DictReader(path.open(newline=""))) if path.is_file() else []
    names = sorted({k for row in earlier + later for k in row})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=names)
    writer.writeheader()
    writer.writerows(earlier + later)
    atomic_write_text(path, buffer.getvalue())


def _loggers(run_dir: Path) -> list[Logger]:
    """metrics.csv always; TensorBoard event files too when tensorboard is installed."""
    loggers: list[Logger] = [CSVLogger(run_dir, name="", version="")]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version=""))
    return loggers


def _strategy(ranks: Ranks, changes_phase: bool) -> str | Strategy:
    """Lightning's strategy for ``ranks``. DDP registers the parameters that need a gradient when it wraps the
    model (``StagedFinetuning.setup`` unfreezes every one the run will train first); while a head warm-up
    leaves the backbone's without one, DDP has to look for unused parameters, so only those runs ask it to."""
    if not ranks.distributed:
        return "auto"
    if ranks.strategy == "fsdp":
        return "fsdp"
    return DDPStrategy(find_unused_parameters=changes_phase)


def _digest(module: TransferModule) -> str:
    """sha256 of every weight and buffer, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _load_best(module: TransferModule, checkpoint: ModelCheckpoint, ranks: Ranks) -> None:
    """The best epoch's weights on every rank (rank 0 wrote them; other machines may not see its disk)."""
    if checkpoint.best_model_path:
        state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)["state_dict"] \
            if ranks.main else None
        module.load_state_dict(ranks.broadcast(state))


def _val_files(samples: Sequence[Sample], skipped: set[str], rows: int) -> list[str]:
    """The file of each row of the validation logits: every rank scores the whole validation split in order,
    the loader drops the files that did not decode, and ``limit_batches`` keeps the first ``rows``."""
    return [str(s.path) for s in samples if str(s.path) not in skipped][:rows]


def _strip(metrics: Mapping[str, float], prefix: str) -> dict[str, float]:
    return {k.removeprefix(prefix): float(v) for k, v in metrics.items() if k.startswith(prefix)}


def _best_epoch(rows: list[dict[str, float]], monitor: str = MONITOR) -> int | None:
    scored = [r for r in rows if monitor in r]
    return int(max(scored, key=lambda r: r[monitor])["epoch"]) if scored else None


def _trained_images(n_train: int, epochs: int, limit: int | float | None, batch_size: int) -> int:
    if isinstance(limit, int):
        return min(n_train, limit * batch_size) * epochs
    return n_train * epochs

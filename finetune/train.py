"""fit(): the one place that wires data -> backbone -> classifier -> LightningModule -> callbacks -> Trainer.

Phases of a run:
1. data: scan the folder (or read a labels CSV), pre-flight check (finetune.data.doctor), split;
2. recipe: as given, or ``auto`` from images per class and the measured domain gap (model/domain.py);
3. probe: while the backbone is frozen its features never change, so they are computed once and the head
   is fitted on them by L-BFGS (model/probe.py). ``small-*`` recipes end here; ``large-*`` recipes start
   fine-tuning from the probed head (LP-FT, Kumar et al. 2022);
4. fine-tuning with Lightning (model/module.py, model/freezing.py) for recipes that train the backbone,
   or when ``cached_features`` is off;
5. the run folder: weights of the best epoch, calibration temperature, metrics, plots, summary, exports.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import platform
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import timm
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar, Timer
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger

from . import __version__, recipes, runs
from .calibration import fit_temperature
from .choice import DOMAINS, base_recipe, domain_sentence, load_splits, measure_domain, resolve_recipe
from .data import ImageFolderDataModule
from .data.doctor import MAX_UNUSABLE_FRACTION, preflight
from .export import export_run
from .model.backbones import create_backbone
from .model.classifier import Classifier
from .model.freezing import StagedFinetuning
from .model.frozen_forward import FrozenPass, choose_backend, loader_workers
from .model.module import OptimConfig, TransferModule, metrics_from_logits
from .model.probe import CachedFeatures, extract_features, feature_pass, fit_linear_probe
from .recipes import Recipe
from .runtime import Precision, choose_precision, tune_allocator

log = logging.getLogger("finetune")

MONITOR = "val/acc"
DEFAULT_EXPORT = ("safetensors", "onnx")  # portable and parity-checked at the end of every fit


@dataclass
class FitResult:
    run_dir: Path
    recipe: Recipe
    metrics: dict[str, float]  # best-checkpoint validation metrics
    summary: dict[str, Any] = field(repr=False)

    @property
    def accuracy(self) -> float:
        return self.metrics["acc"]


def fit(
    data_dir: str | Path,
    recipe: str | Path | Recipe = "auto",
    *,
    model: str | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    domain: str = "auto",
    out: str | Path | None = None,
    labels: str | Path | None = None,
    split_file: str | Path | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    precision: str = "auto",
    feature_backend: str = "auto",
    weights: str | Path | None = None,
    pretrained: bool | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    limit_batches: int | float | None = None,
    max_unusable_fraction: float = MAX_UNUSABLE_FRACTION,
    export: str | Sequence[str] | None = DEFAULT_EXPORT,
) -> FitResult:
    """Fine-tune a pretrained backbone on an image folder; write a self-describing run folder.

    ``overrides`` are recipe fields (``{"lr": 3e-4}``); ``model``, ``epochs``, ``batch_size`` and
    ``pretrained`` are shortcuts for the same. ``feature_backend`` runs the frozen one-off passes (domain gap,
    cached features) in onnxruntime (``"onnx"``, the default on a CPU) or eager PyTorch (``"torch"``).
    ``domain="auto"`` measures how far the images are from ImageNet (used by ``recipe="auto"``).
    ``limit_batches`` caps batches per epoch (smoke tests). ``export`` lists the formats written to
    ``RUN/export`` and parity-checked at the end (None: no export).
    """
    started = time.perf_counter()
    tune_allocator()
    if domain not in DOMAINS:
        raise recipes.RecipeError(f"domain must be one of {DOMAINS}, got {domain!r}")
    data_dir = Path(data_dir)
    checked = preflight(load_splits(data_dir, labels=labels, split_file=split_file, val_fraction=val_fraction,
                                    seed=seed), max_unusable_fraction=max_unusable_fraction, progress=progress)
    splits = checked.splits
    phases = {"preflight_s": time.perf_counter() - started}
    num_classes = len(splits.classes)
    images_per_class = len(splits.train) / num_classes
    shortcuts = {"model": model, "epochs": epochs, "batch_size": batch_size, "pretrained": pretrained}
    merged = {k: v for k, v in shortcuts.items() if v is not None} | dict(overrides or {})
    prec = choose_precision(precision)
    frozen = choose_backend(feature_backend, _device())

    backbone, data_config, chosen, reason, gap = _choose(recipe, domain, merged, splits, prec, frozen.name,
                                                         weights, num_workers, seed)
    log.info("recipe %s: %s", chosen.name, reason)
    phases["recipe_choice_s"] = time.perf_counter() - started - sum(phases.values())

    pl.seed_everything(seed, workers=True, verbose=False)
    if chosen.drop_path:  # stochastic depth is set when timm builds the blocks
        backbone = create_backbone(chosen.model, pretrained=chosen.pretrained, num_classes=num_classes,
                                   weights=weights, drop_path_rate=chosen.drop_path)
    classifier = Classifier(backbone, num_classes, head=chosen.head, head_stages=chosen.head_stages,
                            head_dropout=chosen.head_dropout)
    if prec.channels_last:
        classifier = classifier.to(memory_format=torch.channels_last)
    datamodule = ImageFolderDataModule(
        splits, data_config, batch_size=chosen.batch_size, num_workers=num_workers, seed=seed,
        augment={"scale_min": chosen.scale_min, "hflip": chosen.hflip, "color_jitter": chosen.color_jitter},
        class_balanced=checked.balance.method == "sampler",
    )

    run_dir = runs.new_run_dir(out, data_dir, chosen.name)
    log.info("run folder %s", run_dir)
    (run_dir / "recipe.toml").write_text(f"# resolved recipe: {reason}\n" + chosen.to_toml())
    runs.write_json(run_dir / "classes.json", splits.classes)
    splits.save(run_dir / "split.json")

    probe = (_probe(classifier, datamodule, chosen, prec, frozen.name, run_dir) if _use_probe(chosen, classifier)
             else None)
    module = TransferModule(classifier, _optim_config(chosen, probed=probe is not None),
                            channels_last=prec.channels_last)
    if probe is not None:
        module.skipped_files.update(probe["skipped"])
    finetune_epochs = chosen.epochs - (chosen.freeze_epochs if probe is not None else 0)
    if probe is not None and not chosen.trains_backbone:
        outcome = _finish_probe_only(module, probe, datamodule, run_dir)
    else:
        probed = _probe_candidate(module, probe) if probe is not None else None
        outcome = _train(module, datamodule, chosen, prec, run_dir, finetune_epochs, probe is not None,
                         progress, limit_batches)
        if probed is not None:
            outcome = _keep_the_better(module, probed, probe, outcome, datamodule, run_dir)

    finished = time.perf_counter()
    val_logits, val_labels = outcome.pop("val_outputs")
    calibration = fit_temperature(val_logits, val_labels)
    config = runs.model_config(classifier, chosen.model, splits.classes, data_config,
                               extra={"recipe": chosen.name, "version": __version__,
                                      "temperature": calibration.temperature})
    runs.save_model(run_dir, classifier, config)
    phases["calibrate_and_save_s"] = time.perf_counter() - finished
    exported = None
    if export:
        export_started = time.perf_counter()
        manifest = export_run(run_dir, export)
        exported = {"seconds": time.perf_counter() - export_started,
                    **{fmt: entry["parity"] for fmt, entry in manifest["formats"].items()}}
    skipped = sorted(module.skipped_files | set(checked.excluded))
    summary = {
        "run_dir": str(run_dir),
        "data_dir": str(data_dir),
        "recipe": chosen.name,
        "recipe_reason": reason,
        "domain_gap": None if gap is None else {"score": gap.score, "threshold": gap.threshold,
                                                "domain": gap.domain, "images": gap.images},
        "model": chosen.model,
        "num_classes": num_classes,
        "classes": splits.classes,
        "train_images": len(splits.train),
        "val_images": len(splits.val),
        "test_images": len(splits.test),
        "split_source": splits.split_source,
        "images_per_class": images_per_class,
        "precision": prec.lightning,
        "precision_reason": prec.reason,
        "feature_backend": {"requested": feature_backend, "chosen": frozen.name, "reason": frozen.reason},
        "training": outcome["training"],
        "epochs_run": outcome["epochs_run"],
        "best_epoch": outcome["best_epoch"],
        "val": outcome["val"],
        "test": outcome["test"],
        "calibration": calibration.to_dict(),
        "export": exported,
        "probe": None if probe is None else {k: v for k, v in probe.items()
                                             if k not in ("skipped", "val_features", "runner")},
        "skipped_files": len(skipped),
        "skipped": skipped,
        "preflight": checked.to_dict(),
        "balance": checked.balance.to_dict(),
        "timings": {"total_s": time.perf_counter() - started, **phases, **outcome["timings"],
                    "export_s": exported["seconds"] if exported else 0.0},
        "train_images_per_s": outcome["train_images_per_s"],
        "trainable_parameters": module.trainable_summary(),
        "versions": _versions(),
    }
    runs.write_json(run_dir / "summary.json", summary)
    runs.write_report(run_dir / "report.md", summary)
    if skipped:
        log.warning("skipped %d unreadable file(s): %s", len(skipped), ", ".join(skipped[:10]))
    return FitResult(run_dir=run_dir, recipe=chosen, metrics=outcome["val"], summary=summary)


def _choose(recipe: str | Path | Recipe, domain: str, merged: dict[str, Any], splits, prec: Precision,
            feature_backend: str, weights: str | Path | None, num_workers: int | None, seed: int):
    """The pretrained backbone and the recipe: ``auto`` measures the domain gap with that backbone first."""
    base = base_recipe(recipe, merged)
    backbone = create_backbone(base.model, pretrained=base.pretrained, num_classes=len(splits.classes),
                               weights=weights)
    data_config = timm.data.resolve_model_data_config(backbone)
    gap, domain_reason = None, None
    if str(recipe) == "auto" and domain == "auto":
        if base.pretrained:
            gap = measure_domain(backbone, splits, data_config, prec, num_workers=num_workers, seed=seed,
                                 backend=feature_backend)
        domain, domain_reason = domain_sentence(gap, base.model, base.pretrained)
    per_class = len(splits.train) / len(splits.classes)
    chosen, reason = resolve_recipe(recipe, per_class, "similar" if domain == "auto" else domain, merged,
                                    domain_reason)
    return backbone, data_config, chosen, reason, gap


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _use_probe(r: Recipe, classifier: Classifier) -> bool:
    """Cached features need a frozen phase and a head that is one linear map of the cached vector."""
    has_frozen_phase = not r.trains_backbone or r.freeze_epochs > 0
    linear = classifier.multistage is not None or isinstance(classifier.backbone.get_classifier(), torch.nn.Linear)
    return r.cached_features and has_frozen_phase and linear


def _extract(classifier: Classifier, datamodule: ImageFolderDataModule, split: str, runner: FrozenPass,
             augment: bool = False) -> CachedFeatures:
    workers = loader_workers(runner.requested, datamodule.num_workers)
    return extract_features(classifier, datamodule.feature_loader(split, augment, num_workers=workers),
                            runner=runner)


def _probe(classifier: Classifier, datamodule: ImageFolderDataModule, r: Recipe, prec: Precision, backend: str,
           run_dir: Path) -> dict[str, Any]:
    """Fit the head on features computed once (plus ``feature_views`` augmented passes); install it."""
    classifier.set_trainable(0)
    runner = feature_pass(classifier, device=_device(), bf16=prec.lightning == "bf16-mixed",
                          channels_last=prec.channels_last, backend=backend)  # one trace for every pass
    views = [_extract(classifier, datamodule, "train", runner)]
    views += [_extract(classifier, datamodule, "train", runner, augment=True)
              for _ in range(r.feature_views)]
    train = CachedFeatures(torch.cat([v.features for v in views]), torch.cat([v.labels for v in views]),
                           sorted({p for v in views for p in v.skipped}), sum(v.seconds for v in views))
    val = _extract(classifier, datamodule, "val", runner)
    result = fit_linear_probe(train, val, classifier.num_classes)
    classifier.set_linear_head(result.weight, result.bias, result.mean, result.std)
    best = next(row for row in result.sweep if row["weight_decay"] == result.weight_decay)
    runs.write_probe_sweep(run_dir, result.sweep)
    log.info("probe: head fitted on cached features of %d images in %.1f s (weight decay %g, val acc %.4f)",
             len(train.labels), train.seconds + val.seconds + result.seconds, result.weight_decay, best["val_acc"])
    return {"weight_decay": result.weight_decay, "sweep": result.sweep, "views": 1 + r.feature_views,
            "feature_dim": int(train.features.shape[1]), "features_s": train.seconds + val.seconds,
            "features_backend": val.backend, "runner": runner,
            "fit_s": result.seconds, "skipped": sorted(set(train.skipped) | set(val.skipped)),
            "val_features": val}


def _finish_probe_only(module: TransferModule, probe: dict[str, Any], datamodule: ImageFolderDataModule,
                       run_dir: Path) -> dict[str, Any]:
    """A frozen-backbone recipe is done after the probe: metrics come from the cached validation features."""
    val: CachedFeatures = probe["val_features"]
    val_logits, metrics = _head_scores(module.classifier, val)
    test = _probe_test_metrics(module, datamodule, probe["runner"])  # the backbone has not changed
    runs.save_checkpoint(run_dir / "checkpoints", module.state_dict(), {"phase": "probe", "val": metrics})
    runs.write_final_metrics(run_dir / "metrics.csv", metrics)
    seconds = probe["features_s"] + probe["fit_s"]
    return {"training": "probe: linear head by L-BFGS on cached features", "epochs_run": 0, "best_epoch": None,
            "val": metrics, "test": test, "val_outputs": (val_logits, val.labels),
            "timings": {"train_s": seconds}, "train_images_per_s": len(datamodule.splits.train) / seconds}


def _probe_test_metrics(module: TransferModule, datamodule: ImageFolderDataModule,
                        runner: FrozenPass) -> dict[str, float]:
    """Test metrics of the probed head on the cached-feature pass ({} without a test split)."""
    if not datamodule.has_test:
        return {}
    cached = _extract(module.classifier, datamodule, "test", runner)
    module.skipped_files.update(cached.skipped)
    return _head_scores(module.classifier, cached)[1]


def _head_scores(classifier: Classifier, cached: CachedFeatures) -> tuple[torch.Tensor, dict[str, float]]:
    """The head's logits on cached features, and their metrics."""
    with torch.inference_mode():
        logits = classifier.head_logits(cached.features)
    return logits, metrics_from_logits(logits, cached.labels, classifier.num_classes)


def _probe_candidate(module: TransferModule, probe: dict[str, Any]) -> dict[str, Any]:
    """The probed model as it stands before fine-tuning (LP-FT): weights and validation scores, so that it
    competes with the fine-tuned epochs for "best"."""
    val: CachedFeatures = probe["val_features"]
    logits, metrics = _head_scores(module.classifier, val)
    return {"state": {k: v.detach().clone() for k, v in module.state_dict().items()}, "logits": logits,
            "labels": val.labels, "val": metrics}


def _keep_the_better(module: TransferModule, probed: dict[str, Any], probe: dict[str, Any],
                     outcome: dict[str, Any], datamodule: ImageFolderDataModule, run_dir: Path) -> dict[str, Any]:
    """Fine-tuning keeps its best epoch on validation accuracy; when the probed head alone scored higher than
    every epoch, the probed model is the best one and is what the run keeps (``best.ckpt``, the export)."""
    if probed["val"]["acc"] <= outcome["val"]["acc"]:
        return outcome
    log.info("the probed head (val acc %.4f) beat every fine-tuned epoch (best %.4f): keeping the probed model",
             probed["val"]["acc"], outcome["val"]["acc"])
    module.load_state_dict(probed["state"])
    # the probe's pass computes the pretrained backbone's features: the probed model's
    test = _probe_test_metrics(module, datamodule, probe["runner"])
    runs.save_checkpoint(run_dir / "checkpoints", module.state_dict(),
                         {"phase": "probe", "val": probed["val"], "fine_tuned_best_val": outcome["val"]},
                         names=("best.ckpt",))
    return {**outcome, "val": probed["val"], "test": test, "val_outputs": (probed["logits"], probed["labels"]),
            "best_epoch": None, "kept": "probe",
            "training": outcome["training"] + f"; the probed head (val acc {probed['val']['acc']:.4f}) beat every "
                        f"fine-tuned epoch (best {outcome['val']['acc']:.4f}) and was kept"}


def _train(module: TransferModule, datamodule: ImageFolderDataModule, r: Recipe, prec: Precision, run_dir: Path,
           epochs: int, probed: bool, progress: bool, limit_batches: int | float | None) -> dict[str, Any]:
    """Lightning epochs: all of them, or, after a probe, the fine-tuning epochs only (LP-FT)."""
    timer = Timer()
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor=MONITOR, mode="max",
                                 save_last=True, enable_version_counter=False)
    freeze_epochs = 0 if probed else r.freeze_epochs
    callbacks: list[pl.Callback] = [StagedFinetuning(freeze_epochs, r.unfreeze_stages), checkpoint, timer]
    if r.early_stopping:
        callbacks.append(EarlyStopping(MONITOR, mode="max", patience=r.early_stopping))
    if progress:
        callbacks.append(RichProgressBar(leave=True))
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="auto", devices=1, precision=prec.lightning, logger=_loggers(run_dir),
        callbacks=callbacks, enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
        log_every_n_steps=5, limit_train_batches=limit_batches, limit_val_batches=limit_batches,
    )
    with warnings.catch_warnings():
        for message in (".*does not have many workers.*", ".*Checkpoint directory.*exists and is not empty.*",
                        ".*Experiment logs directory.*",  # ours: it already holds recipe.toml and split.json
                        ".*module\\(s\\) in eval mode.*",  # frozen parts, on purpose
                        ".*smaller than the logging interval.*"):
            warnings.filterwarnings("ignore", message)
        trainer.fit(module, datamodule=datamodule)
        _load_best(module, checkpoint)
        module.collect_outputs, module.outputs = True, []
        val = _strip(trainer.validate(module, datamodule=datamodule, verbose=False)[0], "val/")
        outputs = (torch.cat([o[0] for o in module.outputs]), torch.cat([o[1] for o in module.outputs]))
        module.collect_outputs = False
        test = {}
        if datamodule.has_test:
            test = _strip(trainer.test(module, datamodule=datamodule, verbose=False)[0], "test/")
    rows = runs.read_epoch_metrics(run_dir / "metrics.csv")
    runs.plot_curves(rows, run_dir / "curves.png")
    train_s = timer.time_elapsed("train")
    images = _trained_images(len(datamodule.splits.train), trainer.current_epoch, limit_batches, r.batch_size)
    return {"training": ("LP-FT: probed head, then " if probed else "") + f"{trainer.current_epoch} epoch(s) "
                        f"with Lightning", "epochs_run": trainer.current_epoch, "best_epoch": _best_epoch(rows),
            "val": val, "test": test, "val_outputs": outputs,
            "timings": {"train_s": train_s, "validate_s": timer.time_elapsed("validate")},
            "train_images_per_s": images / train_s if train_s else math.nan}


def _loggers(run_dir: Path) -> list[Logger]:
    """metrics.csv always; TensorBoard event files too when tensorboard is installed."""
    loggers: list[Logger] = [CSVLogger(run_dir, name="", version="")]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version=""))
    return loggers


def _optim_config(r: Recipe, probed: bool = False) -> OptimConfig:
    names = {f.name for f in dataclasses.fields(OptimConfig)}
    config = OptimConfig(**{k: v for k, v in r.to_dict().items() if k in names})
    # after a probe the head is already trained: fine-tuning starts at once, every group warming up together
    return dataclasses.replace(config, freeze_epochs=0) if probed else config


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


def _trained_images(n_train: int, epochs: int, limit: int | float | None, batch_size: int) -> int:
    if isinstance(limit, int):
        return min(n_train, limit * batch_size) * epochs
    return n_train * epochs


def _versions() -> dict[str, str]:
    import albumentations
    import torchmetrics

    return {"finetune": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "pytorch_lightning": pl.__version__,
            "torchmetrics": torchmetrics.__version__, "albumentations": albumentations.__version__}

"""fit(): the one place that wires data -> backbone -> classifier -> phases -> run folder.

1. data: scan the folder (or read a labels CSV), pre-flight check (finetune.data.doctor), split;
2. recipe: as given, or ``auto`` from images per class and the measured domain gap (recipe_choice.py);
3. phases (finetune/phases/): the probe on cached features, then Lightning epochs for recipes that train
   the backbone; each returns an ``Outcome``;
4. the run folder (runs.py): weights of the kept model, calibration temperature, summary, report, exports.

Headline metrics are on the held-out test split when there is one: validation picks the model (weight
decay, best epoch), so its score is not what the model will do on new images.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import timm
import torch

from . import __version__, runs
from .arguments import check_fit_arguments
from .calibration import fit_temperature
from .data import DatasetSplits, ImageFolderDataModule
from .data.balance import BalancePlan, plan_balance
from .data.doctor import MAX_UNUSABLE_FRACTION, PreflightReport, preflight
from .data.splits import load_splits
from .device import Device, resolve_device
from .export import DEFAULT_FORMATS, export_run
from .files import atomic_write_text
from .model.backbones import create_backbone
from .model.classifier import Classifier, check_head_stages
from .model.domain import DomainGap
from .model.frozen_forward import FrozenEngine, choose_backend
from .model.module import TransferModule
from .phases import Outcome
from .phases.epochs import train_epochs
from .phases.probe import Probe, finish_probe_only, keep_the_better, probed_model, run_probe
from .progress import Phases
from .recipe_choice import base_recipe, domain_sentence, measure_domain, resolve_recipe
from .recipes import Recipe
from .runtime import Precision, choose_precision, tune_allocator

log = logging.getLogger("finetune")


@dataclass
class FitResult:
    """``val``: validation metrics (validation picked the model); ``test``: held-out test metrics ({} without a
    test split). ``metrics`` and ``accuracy`` are the headline: test when there is a test split."""

    run_dir: Path
    recipe: Recipe
    val: dict[str, float]
    test: dict[str, float]
    summary: dict[str, Any] = field(repr=False)

    @property
    def headline_split(self) -> str:
        return "test" if self.test else "val"

    @property
    def metrics(self) -> dict[str, float]:
        return self.test or self.val

    @property
    def accuracy(self) -> float:
        return self.metrics["acc"]


@dataclass
class Choice:
    """The recipe to run, why, and the pretrained backbone it starts from."""

    recipe: Recipe
    reason: str
    backbone: torch.nn.Module
    data_config: dict[str, Any]
    gap: DomainGap | None


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
    accelerator: str = "auto",
    progress: bool = True,
    limit_batches: int | float | None = None,
    max_unusable_fraction: float = MAX_UNUSABLE_FRACTION,
    export: str | Sequence[str] | None = DEFAULT_FORMATS,
) -> FitResult:
    """Fine-tune a pretrained backbone on an image folder; write a self-describing run folder.

    ``overrides`` are recipe fields (``{"lr": 3e-4}``); ``model``, ``epochs``, ``batch_size`` and
    ``pretrained`` are shortcuts for the same. ``feature_backend`` runs the frozen one-off passes (domain gap,
    cached features) in onnxruntime (``"onnx"``, the default on a CPU) or eager PyTorch (``"torch"``).
    ``domain="auto"`` measures how far the images are from ImageNet (used by ``recipe="auto"``).
    ``accelerator`` (``auto``, ``cpu``, ``gpu``, ``mps``) is resolved once by ``device.resolve_device``.
    ``limit_batches`` caps batches per epoch (smoke tests). ``export`` lists the formats written to
    ``RUN/export`` and parity-checked at the end (None: no export).
    """
    started = time.perf_counter()
    check_fit_arguments(data_dir=data_dir, recipe=recipe, overrides=overrides, model=model, pretrained=pretrained,
                        val_fraction=val_fraction, seed=seed, num_workers=num_workers, epochs=epochs,
                        batch_size=batch_size, labels=labels, split_file=split_file, weights=weights, out=out,
                        domain=domain, precision=precision, feature_backend=feature_backend, export=export)
    tune_allocator()
    pl.seed_everything(seed, workers=True, verbose=False)  # before the backbone: a random init depends on it
    phases = Phases(enabled=progress)
    shortcuts = {"model": model, "epochs": epochs, "batch_size": batch_size, "pretrained": pretrained}
    merged = {k: v for k, v in shortcuts.items() if v is not None} | dict(overrides or {})
    check_head_stages(base_recipe(recipe, merged).override({k: v for k, v in merged.items() if k == "head_stages"}))
    data_dir = Path(data_dir)
    checked = preflight(load_splits(data_dir, labels=labels, split_file=split_file, val_fraction=val_fraction,
                                    seed=seed), max_unusable_fraction=max_unusable_fraction, progress=progress)
    timings = {"preflight_s": time.perf_counter() - started}
    device = resolve_device(accelerator)
    prec = choose_precision(precision, device)
    engine = choose_backend(feature_backend, device.kind)
    choice = _choose(recipe, domain, merged, checked.splits, device, prec, engine.name, weights, num_workers, seed,
                     phases)
    r = choice.recipe
    log.info("recipe %s: %s", r.name, choice.reason)
    timings["recipe_choice_s"] = time.perf_counter() - started - timings["preflight_s"]

    balance = checked.balance if r.balance == "auto" else plan_balance(checked.balance.class_counts, method=r.balance)
    classifier, datamodule = _build(choice, checked.splits, balance, device, prec, weights, num_workers, seed)
    run_dir = _start_run_dir(out, data_dir, choice, checked.splits)
    outcome, module, probe = _train(classifier, datamodule, r, balance, device, prec, engine.name, run_dir, phases,
                                    progress, limit_batches)

    summary = _finish(_Run(data_dir, run_dir, choice, checked, prec, engine, feature_backend, balance, timings,
                           started), classifier, module, outcome, probe, export, phases)
    return FitResult(run_dir=run_dir, recipe=r, val=outcome.val, test=outcome.test, summary=summary)


@dataclass
class _Run:
    """What the phases before training decided, for the run folder's summary."""

    data_dir: Path
    run_dir: Path
    choice: Choice
    checked: PreflightReport
    precision: Precision
    engine: FrozenEngine
    requested_engine: str
    balance: BalancePlan
    timings: dict[str, float]
    started: float


def _finish(run: _Run, classifier: Classifier, module: TransferModule, outcome: Outcome, probe: Probe | None,
            export: str | Sequence[str] | None, phases: Phases) -> dict[str, Any]:
    """Calibrate, save the selected model, export it, write summary.json and report.md; the summary."""
    r, saved = run.choice.recipe, time.perf_counter()
    calibration = fit_temperature(outcome.val_logits, outcome.val_labels)
    config = runs.model_config(classifier, r.model, run.checked.splits.classes, run.choice.data_config,
                               extra={"recipe": r.name, "version": __version__,
                                      "temperature": calibration.temperature})
    runs.save_model(run.run_dir, classifier, config)
    timings = run.timings | {"calibrate_and_save_s": time.perf_counter() - saved}
    exported = _export(run.run_dir, export, phases)
    timings |= outcome.timings | {"export_s": exported["seconds"] if exported else 0.0,
                                  "total_s": time.perf_counter() - run.started}
    engine = {"requested": run.requested_engine, "chosen": run.engine.name, "reason": run.engine.reason}
    summary = runs.build_summary(
        data_dir=run.data_dir, run_dir=run.run_dir, recipe=r, reason=run.choice.reason, gap=run.choice.gap,
        splits=run.checked.splits, precision=run.precision, engine=engine, outcome=outcome,
        calibration=calibration.to_dict(), exported=exported, probe=None if probe is None else probe.to_summary(),
        preflight=run.checked.to_dict(), balance=_balance_summary(run.balance, probe is not None, r.trains_epochs),
        timings=timings, skipped=sorted(outcome.skipped | set(run.checked.excluded)),
        trainable=module.trainable_summary(),
    )
    runs.write_json(run.run_dir / "summary.json", summary)
    runs.write_report(run.run_dir / "report.md", summary)
    if summary["skipped"]:
        log.warning("skipped %d unreadable file(s): %s", len(summary["skipped"]), ", ".join(summary["skipped"][:10]))
    return summary


def _choose(recipe: str | Path | Recipe, domain: str, merged: dict[str, Any], splits: DatasetSplits,
            device: Device, prec: Precision, engine: str, weights: str | Path | None, num_workers: int | None,
            seed: int,
            phases: Phases) -> Choice:
    """The pretrained backbone and the recipe: ``auto`` measures the domain gap with that backbone first."""
    base = base_recipe(recipe, merged)
    backbone = create_backbone(base.model, pretrained=base.pretrained, num_classes=len(splits.classes),
                               weights=weights)
    data_config = timm.data.resolve_model_data_config(backbone)
    gap, domain_reason = None, None
    if str(recipe) == "auto" and domain == "auto":
        if base.pretrained:
            gap = measure_domain(backbone, splits, data_config, prec, num_workers=num_workers, seed=seed,
                                 backend=engine, phases=phases, device=device)
        domain, domain_reason = domain_sentence(gap, base.model, base.pretrained)
    per_class = len(splits.train) / len(splits.classes)
    chosen, reason = resolve_recipe(recipe, per_class, "similar" if domain == "auto" else domain, merged,
                                    domain_reason)
    return Choice(chosen, reason, backbone, data_config, gap)


def _build(choice: Choice, splits: DatasetSplits, balance: BalancePlan, device: Device, prec: Precision,
           weights: str | Path | None,
           num_workers: int | None, seed: int) -> tuple[Classifier, ImageFolderDataModule]:
    r, backbone = choice.recipe, choice.backbone
    if r.drop_path and r.trains_backbone:  # stochastic depth is set when timm builds the blocks
        backbone = create_backbone(r.model, pretrained=r.pretrained, num_classes=len(splits.classes),
                                   weights=weights, drop_path_rate=r.drop_path)
    classifier = Classifier(backbone, len(splits.classes), head=r.head, head_stages=r.head_stages,
                            head_dropout=r.head_dropout, test_flip=r.test_flip)
    if prec.channels_last:
        classifier = classifier.to(memory_format=torch.channels_last)
    datamodule = ImageFolderDataModule(
        splits, choice.data_config, batch_size=r.batch_size, num_workers=num_workers, seed=seed,
        augment={"scale_min": r.scale_min, "hflip": r.hflip, "color_jitter": r.color_jitter},
        class_balanced=balance.method == "sampler", pin_memory=device.pin_memory,
    )
    return classifier, datamodule


def _start_run_dir(out: str | Path | None, data_dir: Path, choice: Choice, splits: DatasetSplits) -> Path:
    run_dir = runs.new_run_dir(out, data_dir, choice.recipe.name)
    log.info("run folder %s", run_dir)
    atomic_write_text(run_dir / "recipe.toml", f"# resolved recipe: {choice.reason}\n" + choice.recipe.to_toml())
    runs.write_json(run_dir / "classes.json", splits.classes)
    splits.save(run_dir / "split.json")
    return run_dir


def _train(classifier: Classifier, datamodule: ImageFolderDataModule, r: Recipe, balance: BalancePlan,
           device: Device, prec: Precision, engine: str, run_dir: Path, phases: Phases, progress: bool,
           limit_batches: int | float | None):
    """The probe (when the recipe has a frozen phase on cached features), then Lightning epochs (when it
    trains the backbone, or has no cached features): LP-FT when both run."""
    use_probe = r.probes and _linear_head(classifier)
    probe = None
    if use_probe:
        weights = balance.class_weights if balance.method != "none" else None
        probe = run_probe(classifier, datamodule, r, precision=prec, engine=engine, device=device.kind,
                          run_dir=run_dir, phases=phases, class_weights=weights)
    module = TransferModule(classifier, r, probed=probe is not None, channels_last=prec.channels_last,
                            class_weights=balance.class_weights if balance.method == "loss_weights" else None)
    if probe is not None and not r.trains_backbone:
        return finish_probe_only(module, probe, datamodule, run_dir, phases), module, probe
    candidate = probed_model(module, probe) if probe is not None else None
    epochs = r.epochs - (r.freeze_epochs if probe is not None else 0)
    outcome: Outcome = train_epochs(module, datamodule, r, device=device, precision=prec, run_dir=run_dir,
                                    epochs=epochs,
                                    probed=probe is not None, progress=progress, limit_batches=limit_batches)
    if candidate is not None:
        outcome.selection = f"{probe.selection}, then {outcome.selection}"
        outcome = keep_the_better(module, candidate, probe, outcome, datamodule, run_dir, phases)
    return outcome, module, probe


def _export(run_dir: Path, formats: str | Sequence[str] | None, phases: Phases) -> dict[str, Any] | None:
    if not formats:
        return None
    started = time.perf_counter()
    with phases.run("export and parity checks", 1, unit="run") as step:
        manifest = export_run(run_dir, formats)
        step(1)
    return {"seconds": time.perf_counter() - started,
            **{fmt: entry["parity"] for fmt, entry in manifest["formats"].items()}}


def _balance_summary(balance: BalancePlan, probed: bool, epochs: bool) -> dict[str, Any]:
    """The imbalance decision and what it did on each path that ran."""
    applied = {}
    if probed:
        applied["probe"] = ("class-weighted loss, weight decay chosen on balanced accuracy"
                            if balance.method != "none" else "unweighted")
    if epochs:
        applied["epochs"] = {"sampler": "class-balanced sampler", "loss_weights": "class-weighted loss"}.get(
            balance.method, "unweighted")
    return {**balance.to_dict(), "applied": applied}


def _linear_head(classifier: Classifier) -> bool:
    """Cached features need a head that is one linear map of the cached vector."""
    return classifier.multistage is not None or isinstance(classifier.backbone.get_classifier(), torch.nn.Linear)



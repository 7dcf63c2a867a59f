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

import contextlib
import json
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import timm
import torch

from . import __version__, runs
from .arguments import auto_lr, check_fit_arguments, has_learning_rate, output_dir
from .calibration import fit_temperature
from .data import DatasetSplits, ImageFolderDataModule
from .data.balance import BalancePlan, plan_balance
from .data.cache import DEFAULT_BUDGET_BYTES, estimated_bytes
from .data.doctor import MAX_UNUSABLE_FRACTION, PreflightReport, preflight
from .data.splits import load_splits
from .device import Device, resolve_device
from .distributed import Ranks, launch
from .errors import UsageError
from .export import DEFAULT_FORMATS, export_run
from .files import atomic_write_text
from .model.backbones import create_backbone
from .model.classifier import Classifier, Member, check_head_stages
from .model.domain import DomainGap
from .model.frozen_forward import FrozenEngine, choose_backend
from .model.guard import Diverged, advice
from .model.module import TransferModule
from .output_space import check_output_space, run_bytes_needed
from .phases import Outcome, frozen_cache
from .phases.epochs import train_epochs
from .phases.lr_find import (
    MAX_LR,
    MIN_LR,
    MIN_STEPS,
    PLOT,
    LrFinding,
    find_lr,
    read_summary,
    write_lr_find,
)
from .phases.probe import Probe, ProbedModel, finish_probe_only, keep_the_better, probed_model, run_probe
from .phases.resume import LAST, ResumePoint
from .progress import Phases
from .recipe_choice import base_recipe, domain_sentence, measure_domain, resolve_recipe
from .recipes import Recipe
from .report import write_report
from .resolution import Resolution, choose_resolution
from .runtime import Precision, choose_precision, tune_allocator

log = logging.getLogger("finetune")

FIT_ARGUMENTS = "fit.json"  # fit()'s arguments, for fit(resume=RUN)


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
    data_config: dict[str, Any]  # at the resolution chosen
    gap: DomainGap | None
    resolution: Resolution


def fit(
    data_dir: str | Path | None = None,
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
    devices: int = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    checkpoint_every: int | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
    limit_batches: int | float | None = None,
    max_unusable_fraction: float = MAX_UNUSABLE_FRACTION,
    export: str | Sequence[str] | None = DEFAULT_FORMATS,
    callbacks: Sequence[pl.Callback] = (),
) -> FitResult:
    """Fine-tune a pretrained backbone on an image folder; write a self-describing run folder.

    ``overrides`` are recipe fields (``{"lr": 3e-4}``); ``model``, ``epochs``, ``batch_size`` and
    ``pretrained`` are shortcuts for the same. ``feature_backend`` runs the frozen one-off passes (domain gap,
    cached features) in onnxruntime (``"onnx"``, the default on a CPU) or eager PyTorch (``"torch"``).
    ``domain="auto"`` measures how far the images are from ImageNet (used by ``recipe="auto"``).
    ``accelerator`` (``auto``, ``cpu``, ``gpu``, ``mps``) is resolved once by ``device.resolve_device``;
    ``devices`` per machine x ``num_nodes`` machines run Lightning's ``strategy`` (``distributed.launch``:
    ``batch_size`` is per device). ``checkpoint_every`` steps (and after every epoch) ``checkpoints/last.ckpt``
    is written; ``resume=RUN`` continues the interrupted run RUN from it, with the arguments RUN was started
    with (``RUN/fit.json``; the others given here are not used). ``limit_batches`` caps batches per epoch
    (smoke tests). ``export`` lists the formats written to ``RUN/export`` and parity-checked at the end
    (None: no export). ``callbacks``: more Lightning callbacks for the epochs (``finetune tune``'s pruner).
    """
    if resume is not None:
        return _fit(_resumed(Path(resume), progress), continuing=Path(resume), callbacks=callbacks)
    args = FitArguments(data_dir, recipe, model, epochs, batch_size, dict(overrides or {}), domain, out, labels,
                        split_file, val_fraction, seed, precision, feature_backend, weights, pretrained,
                        num_workers, accelerator, devices, num_nodes, strategy, checkpoint_every, progress,
                        limit_batches, max_unusable_fraction, export)
    check_fit_arguments(**args.checked())
    return _fit(args, continuing=None, callbacks=callbacks)


@dataclass
class FitArguments:
    """``fit``'s arguments, as ``RUN/fit.json`` keeps them for ``fit(resume=RUN)``."""

    data_dir: str | Path | None
    recipe: str | Path | Recipe
    model: str | None
    epochs: int | None
    batch_size: int | None
    overrides: dict[str, Any]
    domain: str
    out: str | Path | None
    labels: str | Path | None
    split_file: str | Path | None
    val_fraction: float
    seed: int
    precision: str
    feature_backend: str
    weights: str | Path | None
    pretrained: bool | None
    num_workers: int | None
    accelerator: str
    devices: int
    num_nodes: int
    strategy: str
    checkpoint_every: int | None
    progress: bool
    limit_batches: int | float | None
    max_unusable_fraction: float
    export: str | Sequence[str] | None

    def to_json(self) -> dict[str, Any]:
        """JSON values; paths absolute, so that a resume works from any folder."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("data_dir", "labels", "split_file", "weights"):
            values[name] = None if values[name] is None else str(Path(values[name]).resolve())
        values["recipe"] = self.recipe.name if isinstance(self.recipe, Recipe) else str(self.recipe)
        values["out"] = None if self.out is None else str(self.out)
        return values

    def checked(self) -> dict[str, Any]:
        """The arguments ``check_fit_arguments`` checks."""
        names = ("data_dir", "recipe", "overrides", "model", "pretrained", "val_fraction", "seed", "num_workers",
                 "epochs", "batch_size", "labels", "split_file", "weights", "out", "domain", "precision",
                 "feature_backend", "export", "devices", "num_nodes", "strategy", "checkpoint_every")
        return {name: getattr(self, name) for name in names}


def _fit(a: FitArguments, continuing: Path | None, callbacks: Sequence[pl.Callback] = ()) -> FitResult:
    started = time.perf_counter()
    tune_allocator()
    device = resolve_device(a.accelerator)
    ranks = launch(device, a.devices, a.num_nodes, a.strategy)  # before any work: every rank does it all
    progress = a.progress and ranks.main
    if not ranks.main:
        logging.getLogger("finetune").setLevel(logging.ERROR)  # rank 0 speaks for the run
    pl.seed_everything(a.seed, workers=True, verbose=False)  # before the backbone: a random init depends on it
    phases = Phases(enabled=progress)
    shortcuts = {"model": a.model, "epochs": a.epochs, "batch_size": a.batch_size, "pretrained": a.pretrained}
    lr_auto, merged = auto_lr({k: v for k, v in shortcuts.items() if v is not None} | a.overrides)
    check_head_stages(base_recipe(a.recipe, merged).override({k: v for k, v in merged.items() if k == "head_stages"}))
    data_dir = Path(a.data_dir)
    checked = preflight(load_splits(data_dir, labels=a.labels, split_file=a.split_file, val_fraction=a.val_fraction,
                                    seed=a.seed), max_unusable_fraction=a.max_unusable_fraction, progress=progress)
    timings = {"preflight_s": time.perf_counter() - started}
    prec = choose_precision(a.precision, device)
    engine = choose_backend(a.feature_backend, device.kind)
    choice = _choose(a, merged, checked.splits, device, prec, engine.name, phases, ranks)
    r = has_learning_rate("lr=auto", choice.recipe) if lr_auto else choice.recipe
    log.info("recipe %s: %s", r.name, choice.reason)
    timings["recipe_choice_s"] = time.perf_counter() - started - timings["preflight_s"]

    balance = checked.balance if r.balance == "auto" else plan_balance(checked.balance.class_counts, method=r.balance)
    classifier, datamodule, decoded = _build(choice, checked.splits, balance, device, prec, a, ranks)
    if continuing is None:
        _check_space(a, r, classifier)
    run_dir = continuing or _start_run_dir(a, data_dir, choice, checked.splits, ranks)
    resume = _resume_point(run_dir, r) if continuing else None
    outcome, module, probe = _train(classifier, datamodule, r, balance, device, prec, engine.name, run_dir, phases,
                                    progress, a, ranks, continuing is not None, resume, callbacks)
    choice.recipe = r = module.recipe  # with lr=auto, the rate lr-find chose

    outcome.processes = {"world": ranks.world, "devices": ranks.devices, "num_nodes": ranks.num_nodes,
                         **outcome.processes}
    summary = _finish(_Run(data_dir, run_dir, choice, checked, prec, engine, a.feature_backend, balance, timings,
                           started, device, decoded), classifier, module, outcome, probe, a.export, phases) \
        if ranks.main else {}
    ranks.barrier()  # every rank ends when the run folder is complete
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
    device: Device  # where the export's parity check runs
    decoded_cache: dict[str, Any]  # decoded_cache_plan


def _finish(run: _Run, classifier: Classifier, module: TransferModule, outcome: Outcome, probe: Probe | None,
            export: str | Sequence[str] | None, phases: Phases) -> dict[str, Any]:
    """Calibrate, save the selected model, export it, write summary.json, the validation predictions and the
    report; the summary."""
    r, saved = run.choice.recipe, time.perf_counter()
    calibration = fit_temperature(outcome.val_logits, outcome.val_labels)
    config = runs.model_config(classifier, r.model, run.checked.splits.classes, run.choice.data_config,
                               extra={"recipe": r.name, "version": __version__,
                                      "temperature": calibration.temperature})
    runs.save_model(run.run_dir, classifier, config)
    timings = run.timings | {"calibrate_and_save_s": time.perf_counter() - saved}
    exported = _export(run.run_dir, export, phases, run.device)
    timings |= outcome.timings | {"export_s": exported["seconds"] if exported else 0.0,
                                  "total_s": time.perf_counter() - run.started}
    engine = {"requested": run.requested_engine, "chosen": run.engine.name, "reason": run.engine.reason}
    summary = runs.build_summary(
        data_dir=run.data_dir, run_dir=run.run_dir, recipe=r, reason=run.choice.reason, gap=run.choice.gap,
        splits=run.checked.splits, precision=run.precision, engine=engine, outcome=outcome,
        calibration=calibration.to_dict(), exported=exported, probe=None if probe is None else probe.to_summary(),
        preflight=run.checked.to_dict(), balance=_balance_summary(run.balance, probe is not None, r.trains_epochs),
        timings=timings, skipped=sorted(outcome.skipped | set(run.checked.excluded)),
        trainable=module.trainable_summary(), resolution=run.choice.resolution.to_dict(),
        decoded_cache=run.decoded_cache,
    )
    runs.write_json(run.run_dir / "summary.json", summary)
    runs.write_val_predictions(run.run_dir, outcome.val_logits, outcome.val_labels, outcome.val_files,
                               run.checked.splits)
    write_report(run.run_dir)
    if summary["skipped"]:
        log.warning("skipped %d unreadable file(s): %s", len(summary["skipped"]), ", ".join(summary["skipped"][:10]))
    return summary


def _choose(a: FitArguments, merged: dict[str, Any], splits: DatasetSplits, device: Device, prec: Precision,
            engine: str, phases: Phases, ranks: Ranks) -> Choice:
    """The pretrained backbone and the recipe: ``auto`` measures the domain gap with that backbone first (on
    rank 0: a sample of a few hundred images; the other ranks receive the measurement)."""
    base = base_recipe(a.recipe, merged)
    backbone = create_backbone(base.model, pretrained=base.pretrained, num_classes=len(splits.classes),
                               weights=a.weights)
    data_config = timm.data.resolve_model_data_config(backbone)
    gap, domain, domain_reason = None, a.domain, None
    if str(a.recipe) == "auto" and domain == "auto":
        if base.pretrained and ranks.main:
            gap = measure_domain(backbone, splits, data_config, prec, num_workers=a.num_workers, seed=a.seed,
                                 backend=engine, phases=phases, device=device)
        gap = ranks.broadcast(gap)
        domain, domain_reason = domain_sentence(gap, base.model, base.pretrained)
    per_class = len(splits.train) / len(splits.classes)
    chosen, reason = resolve_recipe(a.recipe, per_class, "similar" if domain == "auto" else domain, merged,
                                    domain_reason)
    resolution = choose_resolution(chosen, splits, data_config["input_size"][-1], a.seed)
    log.info("input resolution %s; crop: %s", resolution.reason, resolution.crop_reason)
    return Choice(chosen, reason, backbone, resolution.data_config(data_config), gap, resolution)


def _build(choice: Choice, splits: DatasetSplits, balance: BalancePlan, device: Device, prec: Precision,
           a: FitArguments, ranks: Ranks) -> tuple[Classifier, ImageFolderDataModule, dict[str, Any]]:
    r, backbone = choice.recipe, choice.backbone
    if r.drop_path and r.trains_backbone:  # stochastic depth is set when timm builds the blocks
        backbone = create_backbone(r.model, pretrained=r.pretrained, num_classes=len(splits.classes),
                                   weights=a.weights, drop_path_rate=r.drop_path)
    members = [_member(name, r, choice.data_config) for name in r.ensemble_members]
    classifier = Classifier(backbone, len(splits.classes), head=r.head, head_stages=r.head_stages,
                            head_dropout=r.head_dropout, test_flip=r.test_flip, members=members)
    classifier.start_head_near_zero(a.seed)
    if prec.channels_last:
        classifier = classifier.to(memory_format=torch.channels_last)
    decoded = decoded_cache_plan(splits, choice.data_config)
    log.info("decoded-image cache %s", decoded["reason"])
    datamodule = ImageFolderDataModule(
        splits, choice.data_config, batch_size=r.batch_size, num_workers=a.num_workers, seed=a.seed,
        augment={"scale_min": r.scale_min, "hflip": r.hflip, "color_jitter": r.color_jitter},
        class_balanced=balance.method == "sampler", pin_memory=device.pin_memory, ranks=ranks,
        decoded_cache=decoded["on"],
    )
    return classifier, datamodule, decoded


def _member(name: str, r: Recipe, data_config: dict[str, Any]) -> Member:
    """One more frozen backbone of an ensemble, reading the input normalised for the first one."""
    backbone = create_backbone(name, pretrained=r.pretrained, num_classes=0)
    own = timm.data.resolve_model_data_config(backbone)
    return Member(backbone, name, r.head_stages if r.head == "multistage" else 0, own["mean"], own["std"],
                  data_config["mean"], data_config["std"])


def decoded_cache_plan(splits: DatasetSplits, data_config: dict[str, Any]) -> dict[str, Any]:
    """Whether the run reads its images through the decoded-image cache (``data/cache.py``): when every split
    of the folder fits the cache's budget, estimated from a sample of image headers. Decoding is then done once,
    not once per epoch and per pass; a folder of large photos beyond the budget is decoded every time."""
    paths = [s.path for s in (*splits.train, *splits.val, *splits.test)]
    need, budget = estimated_bytes(paths, data_config), DEFAULT_BUDGET_BYTES
    on = 0 < need <= budget
    reason = (f"{'on' if on else 'off'}: {len(paths):,} images need about {need / 2**20:,.0f} MiB "
              f"{'within' if on else 'beyond'} its {budget / 2**30:g} GiB budget")
    return {"on": on, "estimated_bytes": need, "budget_bytes": budget, "reason": reason}


def _start_run_dir(a: FitArguments, data_dir: Path, choice: Choice, splits: DatasetSplits, ranks: Ranks) -> Path:
    """Rank 0 makes the run folder and writes what the run starts from; every rank gets its path."""
    run_dir = None
    if ranks.main:
        run_dir = runs.new_run_dir(a.out, data_dir, choice.recipe.name)
        log.info("run folder %s", run_dir)
        atomic_write_text(run_dir / "recipe.toml", f"# resolved recipe: {choice.reason}\n" + choice.recipe.to_toml())
        runs.write_json(run_dir / "classes.json", splits.classes)
        splits.save(run_dir / "split.json")
        runs.write_json(run_dir / FIT_ARGUMENTS, a.to_json())
    return ranks.broadcast(run_dir)


def _resumed(run_dir: Path, progress: bool) -> FitArguments:
    """The arguments ``run_dir`` was started with, its resolved recipe and its split."""
    if not (run_dir / FIT_ARGUMENTS).is_file():
        raise UsageError(f"--resume {run_dir}: not a run folder of finetune {__version__} (no {FIT_ARGUMENTS}); "
                         "give the folder an interrupted `finetune fit` wrote")
    if (run_dir / "summary.json").is_file():
        raise UsageError(f"--resume {run_dir}: this run is complete (it has summary.json); start a new one")
    saved = json.loads((run_dir / FIT_ARGUMENTS).read_text())
    if (read_summary(run_dir) or {}).get("lr"):  # lr=auto found its rate before it stopped: recipe.toml holds it
        saved["overrides"] = auto_lr(saved["overrides"])[1]
    return FitArguments(**saved | {"recipe": str(run_dir / "recipe.toml"), "split_file": str(run_dir / "split.json"),
                                   "out": str(run_dir), "progress": progress})


def _check_space(a: FitArguments, r: Recipe, classifier: Classifier) -> None:
    """Before any training: the run folder's location is writable and has room for what the run writes."""
    weights = sum(t.numel() for t in classifier.state_dict().values())
    trained = sum(p.numel() for p in classifier.parameters())  # an upper bound: stages never unfrozen count
    check_output_space(Path(a.out) if a.out is not None else Path("runs"), run_bytes_needed(
        weights, trained, optimizer=r.optimizer if r.trains_epochs else None,
        formats=a.export or ()))


def _resume_point(run_dir: Path, recipe: Recipe) -> ResumePoint | None:
    """Where the interrupted run stopped: its last checkpoint, or None when it stopped before the epochs."""
    last = run_dir / "checkpoints" / LAST
    if not last.is_file():
        return None
    point = ResumePoint.read(last)
    now = recipe.to_dict()
    changed = [k for k in recipe.active_fields() if k in point.recipe and point.recipe[k] != now[k]]
    if changed:
        raise UsageError(f"--resume {run_dir}: {run_dir / 'recipe.toml'} no longer matches the recipe its "
                         f"checkpoint trained with ({', '.join(changed)}); restore it or start a new run")
    log.info("resuming %s from epoch %d, %d batch(es) into it", run_dir, point.epoch + 1, point.batches_done)
    return point


def _train(classifier: Classifier, datamodule: ImageFolderDataModule, r: Recipe, balance: BalancePlan,
           device: Device, prec: Precision, engine: str, run_dir: Path, phases: Phases, progress: bool,
           a: FitArguments, ranks: Ranks, continued: bool, resume: ResumePoint | None,
           callbacks: Sequence[pl.Callback] = ()):
    """The probe (when the recipe has a frozen phase on cached features), then Lightning epochs (when it
    trains the backbone, or has no cached features): LP-FT when both run. A ``continued`` run reuses its
    saved probe and its epochs go on from ``resume``."""
    module, probe = _module(classifier, datamodule, r, balance, device, prec, engine, run_dir, phases, ranks,
                            continued)
    if probe is not None and not r.trains_backbone:
        return finish_probe_only(module, probe, datamodule, run_dir, phases, ranks), module, probe
    if auto_lr(a.overrides)[0]:
        r = module.recipe = _auto_lr(module, datamodule, r, device, prec, run_dir, progress)
    candidate = probed_model(module, probe) if probe is not None else None
    # what a divergence leaves when no epoch finished: the probed model, else the model as training found it
    start = None if candidate else ProbedModel({k: v.detach().clone() for k, v in module.state_dict().items()},
                                              torch.empty(0), {})
    epochs = r.lightning_epochs(len(datamodule.splits.train), probed=probe is not None)
    if epochs < r.epochs - (r.freeze_epochs if probe is not None else 0):
        log.info("%d epoch(s) of %d images: max_train_images = %d", epochs, len(datamodule.splits.train),
                 r.max_train_images)
    cache, cache_summary = frozen_cache.build(classifier, datamodule, r, device=device, precision=prec, ranks=ranks,
                                              phases=phases, name=run_dir.name) \
        if r.caches_frozen_part else (None, None)
    try:
        with contextlib.ExitStack() as skipping:
            for model in (classifier, *([module.ema.module] if module.ema else [])) if cache else ():
                skipping.enter_context(frozen_cache.skipping(model, cache.owners))
            outcome: Outcome = train_epochs(
                module, frozen_cache.CachedDataModule(datamodule, cache) if cache else datamodule, r, device=device,
                precision=prec, run_dir=run_dir, epochs=epochs, probed=probe is not None, progress=progress,
                limit_batches=a.limit_batches, ranks=ranks, checkpoint_every=a.checkpoint_every, resume=resume,
                callbacks=callbacks)
    except Diverged as e:
        raise Diverged(f"{e}; {_last_good(run_dir, candidate or start, ranks)}; {advice()}") from None
    finally:
        if cache:
            cache.close()
    if candidate is not None:
        outcome.selection = f"{probe.selection}, then {outcome.selection}"
        outcome = keep_the_better(module, candidate, probe, outcome, datamodule, run_dir, phases, ranks)
    outcome.frozen_cache = cache_summary
    outcome.lr_find = read_summary(run_dir)
    if cache:
        outcome.timings["frozen_cache_s"] = cache.fill_s
    return outcome, module, probe


def _module(classifier: Classifier, datamodule: ImageFolderDataModule, r: Recipe, balance: BalancePlan,
            device: Device, prec: Precision, engine: str, run_dir: Path, phases: Phases, ranks: Ranks,
            continued: bool) -> tuple[TransferModule, Probe | None]:
    """The probe, when the recipe fits a head on cached features, and the LightningModule that trains from it."""
    probe = None
    if r.probes and _linear_head(classifier):
        weights = balance.class_weights if balance.method != "none" else None
        probe = run_probe(classifier, datamodule, r, precision=prec, engine=engine, device=device,
                          run_dir=run_dir, phases=phases, class_weights=weights, ranks=ranks,
                          reuse=continued)
    module = TransferModule(classifier, r, probed=probe is not None, channels_last=prec.channels_last,
                            class_weights=balance.class_weights if balance.method == "loss_weights" else None)
    return module, probe


def _auto_lr(module: TransferModule, datamodule: ImageFolderDataModule, r: Recipe, device: Device,
             prec: Precision, run_dir: Path, progress: bool) -> Recipe:
    """``lr=auto``: lr-find's sweep on the module as the epochs will start it; its suggestion becomes the recipe's
    ``lr``, in ``recipe.toml`` too (what a resumed run reads), the sweep in ``RUN/lr_find.{png,csv,json}``."""
    finding = find_lr(module, datamodule, r, device=device, precision=prec, progress=progress)
    write_lr_find(finding, run_dir, _lr_find_title(finding, Path(datamodule.splits.root).resolve().name))
    finding.checked()
    log.info("lr-find: suggested %.2g (%s), using %.2g", finding.suggested, finding.rule, finding.lr)
    found = r.override({"lr": finding.lr})
    header = (run_dir / "recipe.toml").read_text().splitlines()[0]
    atomic_write_text(run_dir / "recipe.toml",
                      f"{header}; lr {finding.lr:g} suggested by lr-find ({PLOT})\n" + found.to_toml())
    return found


def _lr_find_title(finding: LrFinding, data: str) -> str:
    stopped = ", stopped early: the loss blew up" if finding.stopped_early else ""
    return (f"lr-find: {finding.recipe} on {data}, {len(finding.lrs)} of {finding.steps} steps{stopped}\n"
            f"training {finding.trained}")


def lr_find(
    data_dir: str | Path,
    recipe: str | Path | Recipe = "auto",
    *,
    overrides: Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    seed: int = 0,
    steps: int | None = None,
    min_lr: float = MIN_LR,
    max_lr: float = MAX_LR,
    labels: str | Path | None = None,
    val_fraction: float = 0.2,
    precision: str = "auto",
    feature_backend: str = "auto",
    num_workers: int | None = None,
    accelerator: str = "auto",
    progress: bool = True,
) -> LrFinding:
    """``finetune lr-find``: the recipe chosen and the model built as ``fit`` would (with the probe first, for the
    recipes that start fine-tuning from it), then lr-find's sweep (phases/lr_find.py) from ``min_lr`` to
    ``max_lr`` over at most ``steps`` batches (None: ``phases.lr_find.STEPS``). Writes ``lr_find.png``, ``.csv``
    and ``.json`` to ``out`` (default ``runs/<DIR name>-lr-find``); raises ``LrFindFailed`` after writing them
    when the curve has no valley, a ``UsageError`` for a recipe without a learning rate (one that fits its head
    on cached features)."""
    a = FitArguments(data_dir, recipe, None, None, None, dict(overrides or {}), "auto", None, labels, None,
                     val_fraction, seed, precision, feature_backend, None, None, num_workers, accelerator, 1, 1,
                     "auto", None, progress, None, MAX_UNUSABLE_FRACTION, None)
    check_fit_arguments(**a.checked())
    folder = output_dir("out", out) if out is not None else Path("runs") / f"{Path(data_dir).resolve().name}-lr-find"
    if not ((steps is None or isinstance(steps, int) and steps >= MIN_STEPS) and 0 < min_lr < max_lr <= 1):
        raise UsageError(f"lr_find: steps={steps!r}, min_lr={min_lr!r}, max_lr={max_lr!r}: give at least "
                         f"{MIN_STEPS} steps and 0 < min_lr < max_lr <= 1")
    device = resolve_device(accelerator)
    pl.seed_everything(seed, workers=True, verbose=False)
    phases, ranks = Phases(enabled=progress), Ranks()
    checked = preflight(load_splits(Path(data_dir), labels=labels, val_fraction=val_fraction, seed=seed),
                        progress=progress)
    prec, engine = choose_precision(precision, device), choose_backend(feature_backend, device.kind)
    choice = _choose(a, auto_lr(a.overrides)[1], checked.splits, device, prec, engine.name, phases, ranks)
    r = has_learning_rate(f"lr-find ({choice.reason})", choice.recipe)
    balance = checked.balance if r.balance == "auto" else plan_balance(checked.balance.class_counts, method=r.balance)
    classifier, datamodule, _ = _build(choice, checked.splits, balance, device, prec, a, ranks)
    with tempfile.TemporaryDirectory(prefix="finetune-lr-find-") as scratch:  # the probe's files
        module, _ = _module(classifier, datamodule, r, balance, device, prec, engine.name, Path(scratch), phases,
                            ranks, continued=False)
    finding = find_lr(module, datamodule, r, device=device, precision=prec, steps=steps, min_lr=min_lr,
                      max_lr=max_lr, progress=progress)
    write_lr_find(finding, folder, _lr_find_title(finding, Path(data_dir).resolve().name))
    return finding.checked()


def _last_good(run_dir: Path, before: ProbedModel, ranks: Ranks) -> str:
    """After a divergence: the best checkpoint of the epochs that finished, else the model before the epochs (the
    probed one, or the one training started from) saved as one."""
    best = run_dir / "checkpoints" / "best.ckpt"
    if best.is_file():
        return f"the best epoch before it is kept in {best}"
    phase = "probe" if before.val else "start"
    if ranks.main:
        runs.save_checkpoint(run_dir / "checkpoints", before.state, {"phase": phase, "val": before.val},
                             names=("best.ckpt",))
    if before.val:
        return f"the probed model (val acc {before.val['acc']:.4f}) is kept in {best}"
    return f"the model as training started (pretrained backbone, new head) is kept in {best}"


def _export(run_dir: Path, formats: str | Sequence[str] | None, phases: Phases,
            device: Device) -> dict[str, Any] | None:
    if not formats:
        return None
    started = time.perf_counter()
    with phases.run("export and parity checks", 1, unit="run") as step:
        manifest = export_run(run_dir, formats, accelerator=device.accelerator)
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



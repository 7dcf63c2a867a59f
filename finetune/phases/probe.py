"""The probe phase: the frozen backbone runs once over the images (and the recipe's views of them), and the
head is fitted on the cached features by L-BFGS (model/probe.py). ``small-*`` recipes end here; ``large-*``
recipes start fine-tuning from the probed head, which then competes with the fine-tuned epochs (LP-FT)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from .. import runs
from ..data import ImageFolderDataModule
from ..device import Device
from ..distributed import Ranks
from ..files import atomic_write_bytes
from ..model.classifier import Classifier, pooled_features, stage_channels, top_stages
from ..model.frozen_forward import FrozenPass, loader_workers
from ..model.module import TransferModule, metrics_from_logits
from ..model.probe import (
    WEIGHT_DECAYS,
    CachedFeatures,
    ProbeResult,
    extract_features,
    feature_pass,
    fit_linear_probe,
)
from ..progress import Phases
from ..recipes import Recipe
from ..runtime import Precision
from .outcome import Outcome

log = logging.getLogger("finetune")

PROBE_FILE = "probe.safetensors"

Step = Callable[[int], None]


@dataclass
class Probe:
    """The head fitted on cached features, the validation features it was scored on, and what it took."""

    result: ProbeResult
    views: tuple[str, ...]  # what the training set holds, per image
    feature_dim: int
    features_s: float
    backend: str  # what computed the features: "onnx" or "torch"
    val: CachedFeatures  # as the model sees them in eval mode (averaged with the mirror image's: test_flip)
    runner: FrozenPass
    test_flip: bool
    class_weighted: bool
    skipped: set[str]

    @property
    def selection(self) -> str:
        if len(self.result.sweep) == 1:
            return f"probe weight decay {self.result.weight_decay:g} set by the recipe (probe_weight_decay)"
        metric = "balanced accuracy" if self.result.selected_on == "val_balanced_acc" else "accuracy"
        return f"probe weight decay {self.result.weight_decay:g} chosen on validation {metric}"

    def to_summary(self) -> dict:
        return {"weight_decay": self.result.weight_decay, "selected_on": self.result.selected_on,
                "sweep": self.result.sweep, "views": list(self.views), "test_flip": self.test_flip,
                "class_weighted_loss": self.class_weighted, "feature_dim": self.feature_dim,
                "features_s": self.features_s, "features_backend": self.backend, "fit_s": self.result.seconds}


def train_views(recipe: Recipe) -> list[tuple[str, bool, bool]]:
    """(name, augmented, mirrored) of each pass over the training images that the probe is fitted on."""
    views = [("images", False, False)]
    if recipe.flip_views:
        views.append(("mirror images", False, True))
    views += [(f"augmented view {i + 1}", True, False) for i in range(recipe.feature_views)]
    return views


def run_probe(classifier: Classifier, datamodule: ImageFolderDataModule, recipe: Recipe, *, precision: Precision,
              engine: str, device: Device, run_dir: Path, phases: Phases,
              class_weights: Sequence[float] | None = None, ranks: Ranks | None = None,
              reuse: bool = False) -> Probe:
    """Compute the features once (one trace for every pass; sharded over ``ranks``), fit the head (on rank 0,
    which sends it to the others), install it in ``classifier``, and save it with the validation features in
    ``RUN/probe.safetensors``. ``reuse``: load that file instead when the run folder has it (a resumed run)."""
    ranks = ranks or Ranks()
    classifier.set_trainable(0)
    runner = feature_pass(classifier, device=device, bf16=precision.lightning == "bf16-mixed",
                          channels_last=precision.channels_last, backend=engine)
    if reuse and (run_dir / PROBE_FILE).is_file():
        return _load_probe(run_dir / PROBE_FILE, classifier, runner)
    views = train_views(recipe)
    n_train, n_val = len(datamodule.splits.train), len(datamodule.splits.val)
    eval_passes = 2 if classifier.test_flip else 1
    share = datamodule.ranks.share  # this rank's images: what its progress bar counts
    total = share(n_train) * len(views) + share(n_val) * eval_passes
    with phases.run(f"probe features: {n_train} training images x {len(views)} view(s), {n_val} validation "
                    f"x {eval_passes}", total) as step:
        passes = [_extract(classifier, datamodule, "train", runner, step, augment=a, mirror=m) for _, a, m in views]
        val = eval_features(classifier, datamodule, "val", runner, step)
    train = CachedFeatures(torch.cat([p.features for p in passes]), torch.cat([p.labels for p in passes]),
                           sorted({f for p in passes for f in p.skipped}), sum(p.seconds for p in passes))
    del passes  # the views' own copies: on a large set, hundreds of MB held through the fit for nothing
    result = _fit_head(train, val, classifier.num_classes, class_weights, device,
                       recipe.probe_weight_decay) if ranks.main else None
    result = ranks.broadcast(result)
    classifier.set_linear_head(result.weight, result.bias, result.mean, result.std)
    probe = Probe(result, tuple(name for name, _, _ in views), int(train.features.shape[1]),
                  train.seconds + val.seconds, val.backend, val, runner, classifier.test_flip,
                  class_weights is not None, set(train.skipped) | set(val.skipped))
    if ranks.main:
        runs.write_probe_sweep(run_dir, result.sweep)
        _save_probe(run_dir / PROBE_FILE, probe)
    log.info("probe: head fitted on %d cached feature vectors in %.1f s (%s)", len(train.labels),
             probe.features_s + result.seconds, probe.selection)
    return probe


def _fit_head(train: CachedFeatures, val: CachedFeatures, num_classes: int,
              class_weights: Sequence[float] | None, device: Device, weight_decay: float = 0.0) -> ProbeResult:
    """L-BFGS on the accelerator when the features fit in its memory (features, their standardised copy and
    the gradients: about three copies), else on the CPU. The result comes back to the CPU."""
    nbytes = 3 * (train.features.nbytes + val.features.nbytes)
    if device.holds(nbytes):
        train, val = (dataclasses.replace(c, features=device.place(c.features), labels=device.place(c.labels))
                      for c in (train, val))
    decays = (weight_decay,) if weight_decay else WEIGHT_DECAYS  # a fixed one, or chosen on validation
    result = fit_linear_probe(train, val, num_classes, decays, class_weights=class_weights)
    return dataclasses.replace(result, weight=result.weight.cpu(), bias=result.bias.cpu(), mean=result.mean.cpu(),
                               std=result.std.cpu())


def _save_probe(path: Path, probe: Probe) -> None:
    """The fitted head, the validation features it was scored on (all a resumed run needs of the probe) and
    what produced them, as safetensors."""
    r = probe.result
    tensors = {"weight": r.weight, "bias": r.bias, "mean": r.mean, "std": r.std,
               "val_features": probe.val.features, "val_labels": probe.val.labels}
    about = {"weight_decay": r.weight_decay, "sweep": r.sweep, "seconds": r.seconds, "selected_on": r.selected_on,
             "views": list(probe.views), "feature_dim": probe.feature_dim, "features_s": probe.features_s,
             "backend": probe.backend, "test_flip": probe.test_flip, "class_weighted": probe.class_weighted,
             "skipped": sorted(probe.skipped), "val_skipped": probe.val.skipped}
    data = safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                                  metadata={"probe": json.dumps(about)})
    atomic_write_bytes(path, data)


def _load_probe(path: Path, classifier: Classifier, runner: FrozenPass) -> Probe:
    tensors = safetensors.torch.load_file(path)
    with safe_open(path, "pt") as f:
        about = json.loads(f.metadata()["probe"])
    result = ProbeResult(tensors["weight"], tensors["bias"], tensors["mean"], tensors["std"], about["weight_decay"],
                         about["sweep"], about["seconds"], about["selected_on"])
    classifier.set_linear_head(result.weight, result.bias, result.mean, result.std)
    val = CachedFeatures(tensors["val_features"], tensors["val_labels"], about["val_skipped"], 0.0, about["backend"])
    log.info("probe: fitted head and validation features reused from %s", path)
    return Probe(result, tuple(about["views"]), about["feature_dim"], about["features_s"], about["backend"], val,
                 runner, about["test_flip"], about["class_weighted"], set(about["skipped"]))


def eval_features(classifier: Classifier, datamodule: ImageFolderDataModule, split: str, runner: FrozenPass,
                  step: Step | None = None) -> CachedFeatures:
    """The features of ``split`` as the classifier sees them in eval mode: with ``test_flip`` the mean of each
    image's and its mirror image's (the head is linear, so this is the mean of their logits)."""
    plain = _extract(classifier, datamodule, split, runner, step)
    if not classifier.test_flip:
        return plain
    mirrored = _extract(classifier, datamodule, split, runner, step, mirror=True)
    return CachedFeatures((plain.features + mirrored.features) / 2, plain.labels,
                          sorted(set(plain.skipped) | set(mirrored.skipped)), plain.seconds + mirrored.seconds,
                          plain.backend)


# Feature passes kept in memory while ``remembered_features()`` is active, by what determines them, and the
# folder they are also written to (None: memory only).
_remembered: dict[str, CachedFeatures] | None = None
_stored_in: Path | None = None
_views_made: weakref.WeakKeyDictionary[ImageFolderDataModule, int] = weakref.WeakKeyDictionary()  # per datamodule


@contextlib.contextmanager
def remembered_features(folder: str | Path | None = None) -> Iterator[None]:
    """Within this block, a pass over a split that was computed before with the same frozen weights, head
    layout, input transform and images is not computed again: ``finetune tune`` runs many fits that differ only
    in what is done with the features (the probe's regularisation, the views kept), so its trials on the probe
    path take seconds. Augmented views are remembered by their index: the n-th augmented view of a datamodule
    with the same seed. Outside the block nothing is kept (a fit's features can be hundreds of MB).

    With ``folder``, each pass is also written there (``<key>.safetensors``) and read back by a later process:
    a study continued after a kill does not compute its passes again. A file that cannot be read is computed
    again and replaced."""
    global _remembered, _stored_in
    outer, _remembered = _remembered, {} if _remembered is None else _remembered
    outer_folder, _stored_in = _stored_in, Path(folder) if folder is not None else _stored_in
    try:
        yield
    finally:
        _remembered, _stored_in = outer, outer_folder


def _read_pass(path: Path) -> CachedFeatures | None:
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            return CachedFeatures(f.get_tensor("features"), f.get_tensor("labels"), json.loads(meta["skipped"]),
                                  float(meta["seconds"]), meta["backend"])
    except Exception as e:  # noqa: BLE001 - a torn or foreign file: computed again
        log.warning("remembered features %s cannot be read (%s); computing them again", path, e)
        return None


def _write_pass(path: Path, found: CachedFeatures) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, safetensors.torch.save(
        {"features": found.features.contiguous(), "labels": found.labels.contiguous()},
        metadata={"skipped": json.dumps(found.skipped), "seconds": str(found.seconds), "backend": found.backend}))


# A remembered pass holds the pooled outputs of the backbone's top stages (at most this many: the most
# finetune tune's search tries) and its final features, so that every head layout reads a slice of one pass.
WIDE_STAGES = 4
_wide_runners: weakref.WeakKeyDictionary[Classifier, FrozenPass] = weakref.WeakKeyDictionary()


class _TopStages(nn.Module):
    """The pooled outputs of ``stages`` and the final pooled features, side by side."""

    def __init__(self, backbone: nn.Module, stages: list[int]) -> None:
        super().__init__()
        self.backbone, self.stages = backbone, stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(pooled_features(self.backbone, x, self.stages), dim=1)


def _wide(classifier: Classifier) -> tuple[list[int], torch.Tensor] | None:
    """The stages of the wide pass and the columns of it that are ``classifier.head_features``; None when they
    are not a slice of it (ensemble members, more stages, a backbone without feature stages)."""
    info = getattr(classifier.backbone, "feature_info", None)
    if classifier.members or not info:
        return None
    stages = top_stages(classifier.backbone, min(WIDE_STAGES, len(info)))
    if not set(classifier.head_stages) <= set(stages):
        return None
    widths = stage_channels(classifier.backbone, stages)
    starts = [sum(widths[:i]) for i in range(len(widths))]
    keep = [i for i, stage in enumerate(stages) if stage in classifier.head_stages] + [len(stages)]
    return stages, torch.cat([torch.arange(starts[i], starts[i] + widths[i]) for i in keep])


def _pass_key(classifier: Classifier, datamodule: ImageFolderDataModule, split: str, runner: FrozenPass,
              augment: bool, mirror: bool, wide: tuple[list[int], torch.Tensor] | None) -> str:
    """What a feature pass depends on: the frozen weights (a sample of every tensor: fine-tuned or other
    pretrained weights differ everywhere), the pooled stages and ensemble members, the transform, the images,
    the backend and, for augmented views, the seed and the view's index."""
    digest = hashlib.sha256()
    head = {id(p) for p in classifier.backbone.get_classifier().parameters()}  # a linear head: not a feature
    frozen = {**{f"backbone.{k}": v for k, v in classifier.backbone.state_dict(keep_vars=True).items()
                 if id(v) not in head},
              **{f"members.{k}": v for k, v in classifier.members.state_dict().items()}}
    for name, tensor in frozen.items():
        flat = tensor.detach().flatten()
        digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
        digest.update(flat[:: max(1, flat.numel() // 32)].float().cpu().numpy().tobytes())
    samples = {"train": datamodule.splits.train, "val": datamodule.splits.val, "test": datamodule.splits.test}[split]
    view = _views_made.get(datamodule, 0) if augment else None
    layout = ("top", wide[0]) if wide else (classifier.multistage is not None, classifier.head_stages)
    about = [layout, sorted(datamodule.data_config.items()),
             [str(s.path) for s in samples], [s.label for s in samples], runner.requested, split, mirror,
             (datamodule.seed, view, sorted(datamodule.augment.items())) if augment else None]
    digest.update(repr(about).encode())
    return digest.hexdigest()


def _extract(classifier: Classifier, datamodule: ImageFolderDataModule, split: str, runner: FrozenPass,
             step: Step | None = None, *, augment: bool = False, mirror: bool = False) -> CachedFeatures:
    """One pass over ``split``; with several ranks each computes its share and every rank gets them all.
    Inside ``remembered_features()`` a pass computed before is returned as it was: the wide pass of the top
    ``WIDE_STAGES`` stages, computed once, and sliced to the classifier's head layout."""
    if _remembered is None or datamodule.ranks.distributed:
        return _compute(classifier, datamodule, split, runner, step, augment=augment, mirror=mirror)
    wide = _wide(classifier)
    key = _pass_key(classifier, datamodule, split, runner, augment, mirror, wide)
    if augment:
        _views_made[datamodule] = _views_made.get(datamodule, 0) + 1
    stored = _stored_in / f"{key}.safetensors" if _stored_in is not None else None
    found = _remembered.get(key)
    if found is None and stored is not None and stored.is_file():
        found = _read_pass(stored)
    if found is None:
        if wide:
            if classifier not in _wide_runners:
                _wide_runners[classifier] = FrozenPass(_TopStages(classifier.backbone, wide[0]),
                                                       backend=runner.requested, device=runner.device,
                                                       **runner.options)
            runner = _wide_runners[classifier]
        found = _compute(classifier, datamodule, split, runner, step, augment=augment, mirror=mirror)
        if stored is not None:
            _write_pass(stored, found)
    elif step is not None:
        step(len(found.labels) + len(found.skipped))
    _remembered[key] = found
    return dataclasses.replace(found, features=found.features[:, wide[1]]) if wide else found


def _compute(classifier: Classifier, datamodule: ImageFolderDataModule, split: str, runner: FrozenPass,
             step: Step | None = None, *, augment: bool = False, mirror: bool = False) -> CachedFeatures:
    workers = loader_workers(runner.requested, datamodule.num_workers)
    ranks = datamodule.ranks
    mine = extract_features(classifier, datamodule.feature_loader(split, augment, num_workers=workers, shard=True),
                            runner=runner, mirror=mirror, on_batch=step)
    if not ranks.distributed:
        return mine
    shares = ranks.gather(mine)
    return CachedFeatures(torch.cat([s.features for s in shares]), torch.cat([s.labels for s in shares]),
                          sorted({f for s in shares for f in s.skipped}), max(s.seconds for s in shares),
                          mine.backend)


def head_scores(classifier: Classifier, cached: CachedFeatures,
                device: Device) -> tuple[torch.Tensor, dict[str, float]]:
    """The head's logits on cached features, computed on ``device`` (the frozen pass's: ``runner.device``),
    where both are placed; the logits come back to the CPU. Also their metrics."""
    device.place(classifier)  # after Lightning's epochs the model is back on the CPU
    with torch.inference_mode():
        logits = classifier.head_logits(device.place(cached.features)).float().cpu()
    return logits, metrics_from_logits(logits, cached.labels, classifier.num_classes)


def test_scores(classifier: Classifier, datamodule: ImageFolderDataModule, probe: Probe,
                phases: Phases) -> tuple[dict[str, float], set[str]]:
    """Held-out test metrics of the probed head ({} without a test split), on the probe's own pass: the
    backbone has not changed since. Also the test files that could not be decoded."""
    if not datamodule.has_test:
        return {}, set()
    n = len(datamodule.splits.test)
    passes = 2 if classifier.test_flip else 1
    with phases.run(f"test: {n} held-out images", datamodule.ranks.share(n) * passes) as step:
        cached = eval_features(classifier, datamodule, "test", probe.runner, step)
    return head_scores(classifier, cached, probe.runner.device)[1], set(cached.skipped)


def finish_probe_only(module: TransferModule, probe: Probe, datamodule: ImageFolderDataModule, run_dir: Path,
                      phases: Phases, ranks: Ranks) -> Outcome:
    """A frozen-backbone recipe is done after the probe: its scores come from the cached features."""
    val_logits, val = head_scores(module.classifier, probe.val, probe.runner.device)
    test, skipped = test_scores(module.classifier, datamodule, probe, phases)
    if ranks.main:
        runs.save_checkpoint(run_dir / "checkpoints", module.state_dict(), {"phase": "probe", "val": val})
        runs.write_final_metrics(run_dir / "metrics.csv", val)
    seconds = probe.features_s + probe.result.seconds
    return Outcome(training=f"probe: linear head by L-BFGS on cached features of the {', '.join(probe.views)}",
                   selection=probe.selection, val=val, test=test, val_logits=val_logits, val_labels=probe.val.labels,
                   val_files=val_files(datamodule, probe),
                   timings={"train_s": seconds}, train_images_per_s=len(datamodule.splits.train) / seconds,
                   skipped=probe.skipped | skipped)


def val_files(datamodule: ImageFolderDataModule, probe: Probe) -> list[str]:
    """The file of each row of the probe's validation features: each rank's share (``Ranks.shard``) in rank
    order, as ``_extract`` gathers them, without the files that did not decode."""
    ranks, skipped = datamodule.ranks, set(probe.val.skipped)
    shares = (dataclasses.replace(ranks, rank=rank).shard(datamodule.splits.val) for rank in range(ranks.world))
    return [str(s.path) for share in shares for s in share if str(s.path) not in skipped]


@dataclass
class ProbedModel:
    """The probed model as it stands before fine-tuning (LP-FT), so that it competes for "best"."""

    state: dict[str, torch.Tensor]
    logits: torch.Tensor
    val: dict[str, float]


def probed_model(module: TransferModule, probe: Probe) -> ProbedModel:
    logits, val = head_scores(module.classifier, probe.val, probe.runner.device)
    return ProbedModel({k: v.detach().clone() for k, v in module.state_dict().items()}, logits, val)


def keep_the_better(module: TransferModule, probed: ProbedModel, probe: Probe, outcome: Outcome,
                    datamodule: ImageFolderDataModule, run_dir: Path, phases: Phases, ranks: Ranks) -> Outcome:
    """Fine-tuning keeps its best epoch on validation accuracy; when the probed head alone scored higher than
    every epoch, the probed model is the best one and is what the run keeps (``best.ckpt``, the export)."""
    if probed.val["acc"] <= outcome.val["acc"]:
        return outcome
    log.info("the probed head (val acc %.4f) beat every fine-tuned epoch (best %.4f): keeping the probed model",
             probed.val["acc"], outcome.val["acc"])
    module.load_state_dict(probed.state)
    test, skipped = test_scores(module.classifier, datamodule, probe, phases)
    if ranks.main:
        runs.save_checkpoint(run_dir / "checkpoints", module.state_dict(),
                             {"phase": "probe", "val": probed.val, "fine_tuned_best_val": outcome.val},
                             names=("best.ckpt",))
    beaten = f"the probed head (val acc {probed.val['acc']:.4f}) beat every fine-tuned epoch " \
             f"(best {outcome.val['acc']:.4f}) and was kept"
    return Outcome(training=f"{outcome.training}; {beaten}", selection=f"{probe.selection}; {beaten}",
                   val=probed.val, test=test, val_logits=probed.logits, val_labels=probe.val.labels,
                   val_files=val_files(datamodule, probe),
                   epochs_run=outcome.epochs_run, best_epoch=None, kept="probe", timings=outcome.timings,
                   train_images_per_s=outcome.train_images_per_s, skipped=outcome.skipped | skipped,
                   processes=outcome.processes)

"""The LightningModule: loss, optimizer with per-group rates, warm-up + cosine schedule, metrics."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from timm.utils.model_ema import ModelEmaV3
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from ..device import rng_states, set_rng_states
from ..recipes import Recipe
from .classifier import Classifier, GroupSpec, param_groups


def make_metrics(num_classes: int) -> MetricCollection:
    metrics = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        # balanced accuracy is the mean of per-class recalls, i.e. macro-averaged accuracy
        "balanced_acc": MulticlassAccuracy(num_classes, average="macro"),
        "macro_f1": MulticlassF1Score(num_classes, average="macro"),
    }
    if num_classes >= 5:
        metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics)


def warmup_cosine(step: int, start: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier for a group that starts training at ``start``: 0 before, linear warm-up over
    ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if step < start:
        return 0.0
    step -= start
    if step < warmup:
        return (step + 1) / warmup
    remaining = max(1, total - start - warmup)
    progress = min(1.0, (step - warmup) / remaining)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class TransferModule(pl.LightningModule):
    """``classifier`` trained as ``recipe`` says: its optimiser, rates, schedule and label smoothing.

    ``probed``: the head was already fitted on cached features (LP-FT), so every group starts training at
    once instead of after ``recipe.freeze_epochs``. ``class_weights``: one per class, to weigh the loss
    (``balance = "loss_weights"``)."""

    def __init__(self, classifier: Classifier, recipe: Recipe, *, probed: bool = False,
                 class_weights: Sequence[float] | None = None, channels_last: bool = False) -> None:
        super().__init__()
        self.classifier = classifier
        self.recipe = recipe
        self.start_epoch = 0 if probed else recipe.freeze_epochs
        self.register_buffer("class_weights", None if class_weights is None else torch.tensor(class_weights),
                             persistent=False)
        self.channels_last = channels_last
        self.train_metrics = make_metrics(classifier.num_classes).clone(prefix="train/")
        self.val_metrics = make_metrics(classifier.num_classes).clone(prefix="val/")
        self.test_metrics = make_metrics(classifier.num_classes).clone(prefix="test/")
        self.skipped_files: set[str] = set()
        self.group_specs: list[GroupSpec] = []
        self.collect_outputs = False  # when set, evaluation steps keep (logits, labels) for calibration
        self.outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        # The moving average of the weights, scored beside them on every validation batch ("val_ema/").
        self.ema = new_ema(classifier, recipe.ema_decay) if recipe.uses_ema else None
        self.ema_metrics = make_metrics(classifier.num_classes).clone(prefix="val_ema/") if self.ema else None
        # lr-find (phases/lr_find.py): while it is set, Lightning's finder sets one rate on every group and each
        # group steps at its share of it (``lr_ratios``); it is given every training step's loss and says whether
        # the loss has blown up, which ends the sweep
        self.sweep: Callable[[float], bool] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self._layout(x))

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.ndim == 4:  # images, or a cached frozen part's activations
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def keep_ema_weights(self) -> None:
        """Make the moving average the model's weights (what the checkpoint, the export and the scores use)."""
        self.classifier.load_state_dict(self.ema.module.state_dict())

    def train(self, mode: bool = True) -> TransferModule:
        super().train(mode)
        if self.ema is not None:
            self.ema.module.eval()  # only ever evaluated
        return self

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        if self.sweep is not None:  # the finder's scheduler sets every group's rate again before the next step
            for group, ratio in zip(optimizer.param_groups, self.lr_ratios(), strict=True):
                group["lr"] *= ratio
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # here rather than in on_train_batch_end, which runs after the callbacks': a checkpoint written by one
        # of them after this step must hold the average that includes it, or a resumed run would differ
        if self.ema is not None:  # global_step counts this step only after this hook: the first update is step 1
            self.ema.update(self.classifier, step=self.global_step + 1)

    def _step(self, batch, metrics: MetricCollection, stage: str):
        images, labels, skipped = batch
        self.skipped_files.update(skipped)
        if images.shape[0] == 0:  # every image of this batch failed to decode
            return None
        logits = self(images)
        if stage == "val" and self.ema is not None and not self.collect_outputs:
            ema_logits = self.ema.module(self._layout(images)).float()
            self.ema_metrics.update(ema_logits, labels)
            ema_loss = F.cross_entropy(ema_logits, labels, label_smoothing=self.recipe.label_smoothing)  # as val/loss
            self.log("val_ema/loss", ema_loss, on_step=False, on_epoch=True, batch_size=len(labels), sync_dist=True)
            self.log_dict(self.ema_metrics, on_step=False, on_epoch=True)
        if self.collect_outputs and stage != "train":
            self.outputs.append((logits.detach().float().cpu(), labels.cpu()))
        weight = self.class_weights.float() if self.class_weights is not None and stage == "train" else None
        loss = F.cross_entropy(logits.float(), labels, weight=weight, label_smoothing=self.recipe.label_smoothing)
        metrics.update(logits.float(), labels)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=True, batch_size=len(labels),
                 sync_dist=True)  # the mean over ranks (a no-op in one process)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage == "val")
        return loss

    def on_validation_epoch_end(self) -> None:
        """With a moving average: ``val/kept_acc``, the better of the raw and the averaged weights' accuracy,
        which selects the best epoch."""
        if self.ema is not None and not self.collect_outputs:
            kept = torch.maximum(self.val_metrics["acc"].compute(), self.ema_metrics["acc"].compute())
            self.log("val/kept_acc", kept)

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, self.train_metrics, "train")
        if self.sweep is not None and self.sweep(math.nan if loss is None else float(loss.detach())):
            self.trainer.should_stop = True
        return loss

    def validation_step(self, batch, batch_idx):
        return self._step(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx):
        return self._step(batch, self.test_metrics, "test")

    def configure_optimizers(self):
        o = self.recipe
        self.group_specs = param_groups(
            self.classifier, lr=o.lr, backbone_lr_scale=o.backbone_lr_scale, layer_decay=o.layer_decay,
            weight_decay=o.weight_decay, unfreeze_stages=o.unfreeze_stages, freeze_epochs=self.start_epoch,
        )
        groups = [{"params": g.params, "lr": g.lr, "weight_decay": g.weight_decay, "name": g.name}
                  for g in self.group_specs]
        if o.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=o.lr)
        steps_per_epoch = max(1, self.trainer.estimated_stepping_batches // max(1, self.trainer.max_epochs))
        total = int(self.trainer.estimated_stepping_batches)
        warmup = max(1, round(o.warmup_epochs * steps_per_epoch)) if o.warmup_epochs else 0
        lambdas = [
            _GroupSchedule(g.start_epoch * steps_per_epoch, warmup, total, o.min_lr_ratio) for g in self.group_specs
        ]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_ratios(self) -> list[float]:
        """Each optimizer group's rate as a share of the head's (``recipe.lr``): 1 for the head, the recipe's
        ``backbone_lr_scale x layer_decay^k`` for stage k from the top; 0 for a group that starts training after a
        head warm-up (``freeze_epochs``). Call after ``configure_optimizers``."""
        return [g.lr / self.recipe.lr if g.start_epoch == 0 else 0.0 for g in self.group_specs]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The random state too (dropout, stochastic depth), so that a resumed run draws what this one would
        have drawn next (this process's: on several ranks, rank 0's). And the resolved recipe it trains."""
        checkpoint["rng_states"] = rng_states()
        checkpoint["recipe"] = self.recipe.to_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])

    def trainable_summary(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.classifier.parameters())
        trainable = sum(p.numel() for p in self.classifier.parameters() if p.requires_grad)
        return {"total": total, "trainable": trainable}


EMA_WARMUP_POWER = 3 / 4  # timm's choice for runs of up to some 100k steps: decay 0.99 at ~460 steps


def new_ema(classifier: Classifier, decay: float) -> ModelEmaV3:
    """timm's ModelEmaV3 of ``classifier``, its decay ramped up as ``1 - (1 + step)^-3/4`` to at most ``decay``
    (the first update copies the weights), kept in float32 and out of every optimiser and gradient."""
    ema = ModelEmaV3(classifier, decay=decay, use_warmup=True, warmup_power=EMA_WARMUP_POWER)
    ema.module.requires_grad_(False)
    return ema


class _GroupSchedule:
    """A picklable per-group LR lambda (LambdaLR's state_dict stores callable objects' __dict__)."""

    def __init__(self, start: int, warmup: int, total: int, min_ratio: float) -> None:
        self.start, self.warmup, self.total, self.min_ratio = start, warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, self.start, self.warmup, self.total, self.min_ratio)


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """The validation metrics of :class:`TransferModule`, computed on logits already in memory."""
    metrics = make_metrics(num_classes)
    metrics.update(logits.float(), labels)
    values = {k: float(v) for k, v in metrics.compute().items()}
    return {"loss": float(F.cross_entropy(logits.float(), labels)), **values}

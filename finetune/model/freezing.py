"""The freeze/unfreeze schedule as a Lightning callback that saves its phase in checkpoints."""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl

log = logging.getLogger("finetune")


class StagedFinetuning(pl.Callback):
    """Train the head alone for ``freeze_epochs`` epochs, then unfreeze the top ``unfreeze_stages`` stages
    (-1 = all, 0 = never).

    Unlike Lightning's ``BackboneFinetuning`` the optimizer is built once with every group it will ever
    need (see ``param_groups``): a frozen parameter simply has no gradient, so AdamW/SGD keep no state for
    it, and the scheduler gives each group its own warm-up from the epoch it starts training. The phase is
    a function of the epoch, so a resumed run (``fit --resume``) is in the right one; it is also saved in
    checkpoints (``state_dict``).
    """

    def __init__(self, freeze_epochs: int, unfreeze_stages: int) -> None:
        self.freeze_epochs = freeze_epochs
        self.unfreeze_stages = unfreeze_stages
        self.phase = "head"

    def changes_phase(self, epochs: int) -> bool:
        """Whether a run of ``epochs`` epochs unfreezes stages after a head warm-up."""
        return self.unfreeze_stages != 0 and 0 < self.freeze_epochs < epochs

    def phase_for_epoch(self, epoch: int) -> str:
        return "finetune" if self.unfreeze_stages != 0 and epoch >= self.freeze_epochs else "head"

    def _apply(self, pl_module: pl.LightningModule, epoch: int) -> None:
        phase = self.phase_for_epoch(epoch)
        classifier = pl_module.classifier
        classifier.set_trainable(self.unfreeze_stages if phase == "finetune" else 0)
        if phase != self.phase:
            trainable = sum(p.numel() for p in classifier.parameters() if p.requires_grad)
            log.info("epoch %d: %s phase, %s trainable parameters", epoch, phase, f"{trainable:,}")
        self.phase = phase

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Before the strategy wraps the model: DDP only ever reduces the gradients of the parameters that
        need one when it wraps, so every parameter the run will train needs one then."""
        if stage == "fit":
            pl_module.classifier.set_trainable(self.unfreeze_stages)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After a checkpoint's loops are restored (``on_fit_start`` comes before): a run resumed inside an
        epoch gets no ``on_train_epoch_start`` for it, and must still be in that epoch's phase."""
        self._apply(pl_module, trainer.current_epoch)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(pl_module, trainer.current_epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "freeze_epochs": self.freeze_epochs, "unfreeze_stages": self.unfreeze_stages}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.phase = state_dict.get("phase", self.phase)

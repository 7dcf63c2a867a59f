"""Watching a Lightning run while it trains: the divergence guard, the gradient norm and the update-to-weight
ratio of each parameter group (../shared/METHOD.md, "babysitting").

- The guard stops a run whose training loss is NaN or infinite, or whose smoothed loss has grown past
  ``factor`` x its reference: the lowest loss of the phase's first ``WINDOW`` steps (so that a loss that
  explodes within them still has its first value as the reference), never below ln(C) (a fresh head's loss on
  C classes), so that it never fires on a loss a fresh head would have. A new phase (more stages
  unfrozen) takes a new reference. It raises :class:`Diverged` (exit status 3) before any checkpoint of the
  diverged steps is written, so the run folder keeps the last good one.
- ``train/grad_norm``: the global L2 norm of the gradients before clipping (``gradient_clip`` clips it), and
  ``update_ratio/<group>``: ||step of the group's weights|| / ||weights||, every ``log_every_n_steps`` steps, in
  ``metrics.csv``. About 1e-3 is healthy; a group far from it (below ``LOW`` or above ``HIGH``) while it trains
  at half its peak rate or more (not in its warm-up, not late in the decay) is named once per run, the
  groups found at one step in one warning.
- ``lr/<group>``: the learning rate each parameter group (head, stage<i>) steps with, at the same steps: the
  schedule that the run report plots (its ``.no_decay`` part steps at the same rate and is not repeated).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pytorch_lightning as pl
import torch

from ..errors import FinetuneError

log = logging.getLogger("finetune")

WINDOW = 5  # steps whose mean loss is a phase's reference
SMOOTHING = 0.3  # weight of the newest step in the smoothed loss
LOW, HIGH = 1e-5, 1e-1  # update-to-weight ratios outside these are named in a warning


class Diverged(FinetuneError):
    """Training stopped because its loss exploded; ``finetune fit`` exits with status 3."""

    exit_status = 3


class DivergenceGuard(pl.Callback):
    """Stops training when the loss explodes (see the module's doc); ``factor`` 0 turns it off."""

    def __init__(self, num_classes: int, factor: float = 3.0) -> None:
        self.floor = math.log(num_classes)
        self.factor = factor
        self.phase: Any = None
        self.first: list[float] = []
        self.smoothed: float | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.factor or outputs is None:
            return
        loss = float((outputs["loss"] if isinstance(outputs, dict) else outputs).detach())
        phase = tuple(p.requires_grad for p in pl_module.parameters())
        if phase != self.phase:  # the first step, or more stages unfrozen: a new reference
            self.phase, self.first, self.smoothed = phase, [], None
        step = trainer.global_step
        if not math.isfinite(loss):
            self._stop(step, f"the training loss is {loss}")
        if len(self.first) < WINDOW:
            self.first.append(loss)
        self.smoothed = loss if self.smoothed is None else SMOOTHING * loss + (1 - SMOOTHING) * self.smoothed
        reference = max(min(self.first), self.floor)
        if self.smoothed > self.factor * reference:
            self._stop(step, f"the smoothed training loss {self.smoothed:.3g} is over {self.factor:g} x "
                             f"{reference:.3g}, the lowest of this phase's first {WINDOW} steps (at least ln(C))")

    def _stop(self, step: int, why: str) -> None:
        raise Diverged(f"training diverged at step {step}: {why}")


def advice() -> str:
    return ("try a learning rate 10x lower (--set lr=...), gradient clipping (--set gradient_clip=1.0) or a longer "
            "warm-up (--set warmup_epochs=2); --set divergence_factor=0 turns this guard off")


class TrainingSignals(pl.Callback):
    """Logs the gradient norm, each group's learning rate and update-to-weight ratio (see the module's doc)."""

    def __init__(self) -> None:
        self.before: dict[str, list[torch.Tensor]] = {}
        self.full_rate: set[str] = set()
        self.warned: set[str] = set()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=True, batch_size=1)
        for name, lr in _rates(optimizer).items():
            pl_module.log(f"lr/{name}", lr, on_step=True, on_epoch=False, batch_size=1)
        if self._logs(trainer):
            self.before = {_name(g, i): [p.detach().clone() for p in g["params"]]
                           for i, g in enumerate(optimizer.param_groups) if g["lr"] > 0}
            # warnings only at full rate: during warm-up and late in the decay a small ratio is expected
            self.full_rate = {_name(g, i) for i, g in enumerate(optimizer.param_groups)
                              if g["lr"] >= 0.5 * g.get("initial_lr", g["lr"])}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.before:
            return
        groups = {_name(g, i): g["params"] for i, g in enumerate(trainer.optimizers[0].param_groups)}
        far: dict[str, float] = {}
        for name, old in self.before.items():
            new = groups[name]
            step = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm((n.detach() - o).float())
                                                         for n, o in zip(new, old, strict=True)]))
            size = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(o.float()) for o in old]))
            ratio = float(step / size) if float(size) > 0 else 0.0
            pl_module.log(f"update_ratio/{name}", ratio, on_step=True, on_epoch=False, batch_size=1)
            if ratio and not LOW <= ratio <= HIGH and name not in self.warned and name in self.full_rate:
                far[name] = ratio
        if far:
            self.warned |= far.keys()
            low = ", ".join(f"{name} {ratio:.1e}" for name, ratio in far.items() if ratio < LOW)
            high = ", ".join(f"{name} {ratio:.1e}" for name, ratio in far.items() if ratio > HIGH)
            log.warning("update-to-weight ratios far from about 1e-3 at step %d (healthy between %g and %g): %s",
                        trainer.global_step, LOW, HIGH, "; ".join(
                            ([f"too low, barely trained: {low} (their rate is lr x backbone_lr_scale x "
                              "layer_decay^k for the k-th stage from the top: raise one)"] if low else []) +
                            ([f"too high: {high} (lower lr)"] if high else [])))
        self.before = {}

    @staticmethod
    def _logs(trainer: pl.Trainer) -> bool:
        return (trainer.global_step + 1) % max(1, trainer.log_every_n_steps) == 0


def _name(group: dict, index: int) -> str:
    return str(group.get("name", f"group{index}"))


def _rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Each group's learning rate, by group name without the ``.no_decay`` suffix (the same rate)."""
    rates: dict[str, float] = {}
    for i, group in enumerate(optimizer.param_groups):
        rates.setdefault(_name(group, i).removesuffix(".no_decay"), float(group["lr"]))
    return rates

"""Stopping a run so that it can go on: resumable checkpoints inside epochs, and a clean stop on SIGINT/SIGTERM.

``SaveAndStop`` writes ``checkpoints/last.ckpt`` (Lightning's full checkpoint: the weights, the optimizer,
the scheduler, the loops' progress and every callback's state, such as the freeze/unfreeze phase and the best
score) after every epoch, every ``every`` optimizer steps, and on SIGINT or SIGTERM, after which it stops the
run with :class:`Interrupted`. ``fit(resume=RUN)`` continues from it: the epoch sampler leaves out the images
the interrupted epoch already trained on (``data/sampling.py``), so the run goes on as if never stopped.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from ..distributed import Ranks
from ..errors import Interrupted

log = logging.getLogger("finetune")

LAST = "last.ckpt"


@dataclass(frozen=True)
class ResumePoint:
    """Where a checkpoint stopped: ``epoch`` (0-based) and the batches of it already trained on."""

    path: Path
    epoch: int
    batches_done: int
    recipe: dict[str, Any]  # the resolved recipe the checkpoint was trained with
    global_step: int = 0  # optimizer steps done

    @classmethod
    def read(cls, path: Path) -> ResumePoint:
        state = torch.load(path, map_location="cpu", weights_only=True)
        progress = state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
        # a checkpoint written in on_train_batch_end counts its batch as processed, not yet completed
        return cls(path, int(state["epoch"]), int(progress["processed"]), state.get("recipe", {}),
                   int(state.get("global_step", 0)))


class SaveAndStop(pl.Callback):
    """Write ``checkpoints/last.ckpt`` after every epoch (its validation included) and every ``every``
    optimizer steps; on SIGINT/SIGTERM, write it after the current step and raise :class:`Interrupted`."""

    def __init__(self, run_dir: Path, ranks: Ranks, every: int | None = None) -> None:
        self.run_dir, self.ranks, self.every = run_dir, ranks, every
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # one small tensor all-reduce per step on several ranks (a pickled all-gather costs far more)
        stop = trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False)
        if stop or (self.every and trainer.global_step % self.every == 0):
            self.save(trainer)
        if stop:
            signum = self.signum or signal.SIGTERM  # a rank that did not get the signal stops with the others
            raise Interrupted(signum, self.run_dir, trainer.global_step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)

    def save(self, trainer: pl.Trainer) -> None:
        """Atomically: the checkpoint is complete or absent, whenever the process dies."""
        final = self.run_dir / "checkpoints" / LAST
        partial = final.with_suffix(".ckpt.partial")
        trainer.save_checkpoint(partial)  # every rank takes part; rank 0 writes
        if self.ranks.main:
            os.replace(partial, final)
        self.ranks.barrier()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

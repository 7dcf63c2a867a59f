"""One run on several processes: the launch, the ranks, and the few collectives ``fit`` needs outside training.

Training itself is Lightning's (``--strategy ddp`` or ``fsdp``; ``phases/epochs.py``). Everything before and
after it runs on every rank too, the way Lightning runs a script: each rank scans the folder and builds the
model (both deterministic), the frozen passes are sharded (each rank computes every ``world``-th image, then
the shares are gathered), the probe is fitted on rank 0 and broadcast, and only rank 0 writes the run folder.

``launch`` starts the processes before any of that, so the process group exists from the start:

- ``finetune fit DIR --devices N`` on one machine: rank 0 starts ranks 1..N-1 by running the same command
  line again (Lightning's subprocess launcher, through ``lightning_fabric.Fabric.launch``);
- ``torchrun`` or SLURM's ``srun`` start every rank themselves and set the environment it reads
  (``--devices`` and ``--num-nodes`` must then say what the launcher started; Lightning checks).

Lightning's Trainer later finds the process group open and uses it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch.distributed as dist

from .device import Device
from .errors import UsageError

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: ``rank`` of ``world`` processes over ``devices`` x ``num_nodes``."""

    rank: int = 0
    world: int = 1
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes the run folder, logs progress and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items``: every ``world``-th one from ``rank``."""
        return list(items[self.rank::self.world])

    def share(self, count: int) -> int:
        """How many of ``count`` items ``shard`` gives this rank."""
        return len(range(self.rank, count, self.world))

    def gather(self, value: T) -> list[T]:
        """``value`` from every rank, in rank order (``[value]`` in one process)."""
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank."""
        if not self.distributed:
            return value
        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def launch(device: Device, devices: int = 1, num_nodes: int = 1, strategy: str = "auto") -> Ranks:
    """Start (or join) the processes of a run on ``devices`` per machine x ``num_nodes`` machines and open the
    process group (gloo on CPUs, nccl on CUDA GPUs); in a single process, nothing to do. The arguments were
    checked by ``arguments.check_fit_arguments``."""
    if strategy == "fsdp" and device.kind != "cuda":
        raise UsageError("--strategy fsdp: Lightning's FSDP needs CUDA GPUs; use --strategy ddp on "
                         f"{device.name}")
    if devices * num_nodes == 1:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError(f"a launcher started {os.environ['WORLD_SIZE']} processes but --devices 1 "
                             "--num-nodes 1 were given; pass the --devices and --num-nodes it started")
        return Ranks(strategy=strategy)
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), devices, num_nodes, strategy)
    from lightning_fabric import Fabric  # only multi-process runs need it

    # Fabric launches and opens the process group; the Trainer's strategy (ddp or fsdp) then reuses it
    fabric = Fabric(accelerator=device.accelerator, devices=devices, num_nodes=num_nodes, strategy="ddp")
    fabric.launch()  # on CUDA this also makes the rank's own GPU the current device
    return Ranks(fabric.global_rank, fabric.world_size, devices, num_nodes, strategy)


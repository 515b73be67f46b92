"""Data parallelism for the RL loop: one process (every method a no-op) or N under a launcher.

Under ``accelerate launch --multi_gpu --num_processes N`` or ``torchrun --nproc_per_node N``
(``WORLD_SIZE`` > 1 in the environment) an ``accelerate.Accelerator`` joins the process group:
NCCL on GPUs, gloo on CPU. Each process then works on its own contiguous shard of the global
batch, the policy is wrapped in DistributedDataParallel (gradients all-reduced, averaged), and the
small per-sample tensors the loop needs globally (rewards for the baseline, metrics) are gathered.

Note: ``accelerate launch --cpu --num_processes 2`` starts ONE process (accelerate 1.x sends
``--cpu`` to its single-process launcher); on a CPU-only machine use ``--multi_gpu`` (the script
still runs on CPU, with gloo) or torchrun.

A single process never imports accelerate here, so its behaviour is exactly the plain loop's.

Threads: each of N processes on one machine gets its cores / N torch threads, less the cores other
processes keep busy (:func:`alignment.hardware.apply_threads`, with :func:`local_world_size`); the
launchers' own default (``OMP_NUM_THREADS=1`` per worker) is not taken as a choice, ``ALIGN_THREADS`` is.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def launched_world_size() -> int:
    """Processes in the launch (torchrun/accelerate set WORLD_SIZE); 1 when run plainly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_world_size() -> int:
    """Processes of the launch on this machine, sharing its cores (torchrun/accelerate set LOCAL_WORLD_SIZE;
    else WORLD_SIZE, one machine); 1 when run plainly. ``alignment.hardware.apply_threads`` divides the
    cores by it."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or launched_world_size())


def launched_rank() -> int:
    """This process's rank in the launch (torchrun/accelerate set RANK); 0 when run plainly."""
    return int(os.environ.get("RANK", "0"))


class DataParallel:
    """The few collective operations the REINFORCE loop uses, for 1 or N processes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.world = launched_world_size()
        self.rank = 0
        self.accelerator = None
        if self.world > 1:
            from accelerate import Accelerator

            # mixed_precision="no": the loop applies its own bf16 autocast (config.bf16), and an
            # accelerate-level autocast from `accelerate launch --mixed_precision` would override it.
            self.accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="no")
            self.rank = self.accelerator.process_index
            self.device = self.accelerator.device  # cuda:<local rank> on a multi-GPU host

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> Sequence[T]:
        """This process's contiguous share of a global batch (rank order = batch order)."""
        if len(items) % self.world:
            raise ValueError(f"{len(items)} items do not split evenly over {self.world} processes")
        per = len(items) // self.world
        return items[self.rank * per:(self.rank + 1) * per]

    def local(self, gathered: torch.Tensor) -> torch.Tensor:
        """Inverse of ``gather`` for this process: its rows of a gathered (N * world, ...) tensor."""
        return self.shard(gathered)  # type: ignore[return-value]

    def prepare(self, model, optimizer) -> tuple[Any, Any]:
        """(DDP-wrapped model, wrapped optimizer); the same objects for one process."""
        if self.accelerator is None:
            return model, optimizer
        return self.accelerator.prepare(model, optimizer)

    def no_sync(self, model):
        """Skip the gradient all-reduce for the backward of graphs built inside (non-final micro-batches)."""
        return contextlib.nullcontext() if self.accelerator is None else self.accelerator.no_sync(model)

    def backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every process's (n, ...) tensor in rank order, on CPU; identity for one process."""
        if self.accelerator is None:
            return tensor
        dtype = tensor.dtype
        # gloo all-gathers no bool tensors; float64 keeps integer counts and fp32 values exact.
        gathered = self.accelerator.gather(tensor.detach().to(self.device, torch.float64).contiguous())
        return gathered.cpu().to(dtype)

    def gather_objects(self, items: list) -> list:
        """Concatenate every process's list of picklable items in rank order."""
        if self.accelerator is None:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    def mean(self, value: float) -> float:
        """The mean of a scalar over processes."""
        return float(self.gather(torch.tensor([value], dtype=torch.float64)).mean()) if self.world > 1 else value

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

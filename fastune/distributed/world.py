"""The job a process belongs to: joining torchrun's process group, this rank's place
and device, and the few collectives the recipe calls directly."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from fastune.errors import FastuneError

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedError(FastuneError):
    """A multi-process setting that cannot work; the message names the option or key."""


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place in the job, and the device it computes (and communicates) on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in _TORCHRUN_ENV)


def _device_for(local_rank: int, device: str) -> torch.device:
    """``device`` is the config's (auto, cpu, cuda): a GPU per local rank on CUDA."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DistributedError("device: cuda asked for, but torch sees no CUDA device; use device=cpu or auto")
    if local_rank >= torch.cuda.device_count():
        raise DistributedError(f"--nproc-per-node: local rank {local_rank} has no GPU "
                               f"(this node has {torch.cuda.device_count()})")
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def process_group(device: str = "auto", timeout_s: float = 1800) -> Iterator[Optional[World]]:
    """The job this process belongs to, or None outside torchrun (a single process).

    Joins (and at the end leaves) the default process group: NCCL on CUDA, gloo on
    CPU. A process group that already exists (a caller that set one up) is used as
    it is and left open. ``timeout_s`` bounds every collective: it must exceed the
    longest pause of one rank, which is rank 0 writing the HF export of a checkpoint.
    """
    if dist.is_available() and dist.is_initialized():
        yield current_world(device)
        return
    if not launched_by_torchrun():
        yield None
        return
    local_rank = int(os.environ["LOCAL_RANK"])
    compute = _device_for(local_rank, device)
    if compute.type == "cuda":
        torch.cuda.set_device(compute)
    dist.init_process_group(
        # gloo beside NCCL: with fsdp_cpu_offload the shards, gradient norms and export
        # gathers are CPU tensors, whose collectives NCCL cannot run.
        backend="cpu:gloo,cuda:nccl" if compute.type == "cuda" else "gloo",
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=compute if compute.type == "cuda" else None,
    )
    try:
        yield current_world(device)
    finally:
        dist.destroy_process_group()


def current_world(device: str = "auto") -> Optional[World]:
    """The job of the initialized default process group, or None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return World(dist.get_rank(), dist.get_world_size(), local_rank, _device_for(local_rank, device))


def sum_over_ranks(tensor: torch.Tensor, world: Optional[World]) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all ranks (a new tensor on this rank's
    device); ``tensor`` itself without a job. Use float64 for counts, so they stay exact."""
    if world is None:
        return tensor
    total = tensor.to(world.device, copy=True)
    dist.all_reduce(total)
    return total


def gather_objects(obj: Any, world: World) -> list[Any]:
    """``obj`` of every rank, in rank order, on every rank (small picklable values only)."""
    out: list[Any] = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out

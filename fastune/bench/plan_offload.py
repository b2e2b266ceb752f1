"""What activation offloading does to device memory, for ``fastune plan`` on fake tensors."""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from typing import Optional

import torch
from torch import nn


@dataclasses.dataclass(eq=False)
class _OffloadedStorage:
    """One offloaded storage: its size and device, and its copy back while backward uses it."""

    nbytes: int
    device: torch.device
    pending: int = 0  # saved tensors still to be unpacked
    back: Optional[torch.Tensor] = None


def offloading_hooks(model: nn.Module):
    """On fake tensors, what ``fastune.training.memory.offload_activations`` does to device
    memory: storages of at least its ``min_bytes`` (weights excepted) leave the device in
    forward and come back, as new allocations, in backward. As there, ONCE per storage:
    tensors saved by several consumers (the q/k/v input, gate/up's) share one copy back,
    freed when the last of them has been unpacked."""
    from fastune.training.memory import offload_activations, weight_detector

    min_bytes = inspect.signature(offload_activations).parameters["min_bytes"].default
    is_weight = weight_detector(model)
    offloaded: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def pack(t):
        storage = t.untyped_storage()
        if storage.nbytes() < min_bytes or is_weight(t):
            return t
        entry = offloaded.get(storage)
        if entry is None:
            entry = offloaded[storage] = _OffloadedStorage(storage.nbytes(), t.device)
        entry.pending += 1
        return (entry, t.dtype, t.storage_offset(), t.size(), t.stride())

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        entry, dtype, offset, size, stride = packed
        if entry.back is None:
            entry.back = torch.empty(entry.nbytes, dtype=torch.uint8, device=entry.device)
        back = entry.back
        entry.pending -= 1
        if entry.pending == 0:  # autograd holds what it still needs
            entry.back = None
        # A view of the bytes, not ``set_`` as the real hooks do: under fake tensors a
        # tensor made by ``set_`` keeps the storage alive past its last use.
        return back.view(dtype).as_strided(size, stride, offset)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

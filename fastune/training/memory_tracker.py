"""A dispatch-level memory tracker: live tensor bytes by category, and their peak.

``MemoryTracker`` is a ``TorchDispatchMode``. Every tensor storage an aten op
creates while it is active is recorded with its size and the moment (a counter of
allocations and frees) it appeared; a weak reference tells when the storage is
freed. Storages that exist before (parameters, optimizer state, the batch) are
registered with ``track_existing``. The running sum of live bytes gives the peak,
and the records give the bytes live at the peak, by category:

- ``parameters``: parameters and buffers (NF4 weights count their packed bytes);
- ``gradients``: storages that ended up in a parameter's ``.grad``;
- ``optimizer_state``: storages held in ``optimizer.state``;
- ``activations``: anything else created during the forward pass and still alive
  when it ends (the tensors saved for backward, the loss), and the batch;
- ``temporary``: forward-pass tensors freed before the forward pass ends, and
  anything else created during backward or the optimizer step (gradients of
  activations, optimizer work buffers).

A storage's category is decided when the step is over (``finish``), so a gradient
that appears in the middle of backward counts as a gradient at the peak, not as a
temporary. It works the same on real tensors and on ``FakeTensorMode`` tensors:
fake tensors have storages of the right size that hold no memory, which is how
``fastune plan`` runs a training step of a model that would not fit here.

What it cannot see: memory an op allocates and frees inside its own kernel
(oneDNN/cuBLAS workspaces, flash-attention scratch), allocator caching and
fragmentation, and the CUDA context. fastune's own opaque ops that hold large
buffers inside declare them (``_workspaces``): the fused linear cross-entropy's
chunk of logits is counted as a temporary for the duration of the op.
``round_to`` rounds every storage up as the CUDA caching allocator does (512 bytes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import weakref
from typing import Iterable, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten


def _workspaces() -> dict:
    """Opaque ops -> a function of their arguments giving the bytes they hold inside."""
    lce = importlib.import_module("fastune.kernels.linear_cross_entropy")
    return {torch.ops.fastune.linear_cross_entropy.default: lce.workspace_bytes}


CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "temporary")
_PHASE_CATEGORY = {"forward": "activations", "backward": "temporary", "optimizer": "temporary"}


def storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages that hold ``t``'s data: its own, or its inner tensors' for a wrapper
    subclass such as torchao's NF4Tensor (whose outer storage holds nothing) or a
    DTensor (its local shard, whose NF4 inner tensors recursively). A subclass may list
    non-tensor attributes among its inner names (DTensor lists its ``device_mesh``):
    only tensors hold storage."""
    if not is_traceable_wrapper_subclass(t):
        return [t.untyped_storage()]
    names, _ = t.__tensor_flatten__()
    inner = (getattr(t, name) for name in names)
    return [s for x in inner if isinstance(x, torch.Tensor) for s in storages(x)]


@dataclasses.dataclass
class _Record:
    nbytes: int
    born: int  # the event counter when it was allocated
    died: Optional[int]  # ... and freed; None while alive
    category: str
    forward: Optional[int] = None  # index of the forward phase that created it


@dataclasses.dataclass
class MemoryReport:
    """Bytes live at the peak of a tracked region, in total and by category."""

    peak_bytes: int
    by_category: dict[str, int]
    phase_at_peak: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class MemoryTracker(TorchDispatchMode):
    """Tracks live storage bytes while active (see the module docstring).

    Use::

        tracker = MemoryTracker()
        tracker.track_existing(model.parameters(), "parameters")
        with tracker:
            with tracker.phase("forward"): ...
            with tracker.phase("backward"): ...
        report = tracker.finish(model, optimizer)
    """

    def __init__(self, round_to: int = 1):
        super().__init__()
        self.round_to = round_to
        self._records: dict[int, _Record] = {}  # storage key -> record, live or dead
        self._refs: dict[int, weakref.ref] = {}  # storage key -> weak reference, while alive
        self._dead: list[_Record] = []  # records of freed storages whose key may be reused
        self._events = 0
        self._live = 0
        self._peak = 0
        self._peak_event = 0
        self._phase = "forward"
        self._phase_at_peak = "forward"
        self._forward_ends: list[int] = []  # the event counter at the end of each forward phase
        self._op_workspaces = _workspaces()

    # ------------------------------------------------------------------ recording

    def _rounded(self, nbytes: int) -> int:
        return -(-nbytes // self.round_to) * self.round_to

    def _add(self, storage: torch.UntypedStorage, category: str, forward: Optional[int] = None) -> None:
        key = storage._cdata
        if key in self._refs:
            return  # a view, an in-place result, or an already-known tensor
        self._events += 1
        record = _Record(self._rounded(storage.nbytes()), self._events, None, category, forward)
        self._records[key] = record
        self._refs[key] = weakref.ref(storage, lambda _, key=key: self._free(key))
        self._live += record.nbytes
        if self._live > self._peak:
            self._peak, self._peak_event, self._phase_at_peak = self._live, self._events, self._phase

    def _free(self, key: int) -> None:
        record = self._records.pop(key, None)
        self._refs.pop(key, None)
        if record is None:
            return
        self._events += 1
        record.died = self._events
        self._live -= record.nbytes
        self._dead.append(record)

    def track_existing(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        """Count tensors that exist before the tracked region (parameters, the batch)."""
        for t in tensors:
            if t is not None:
                for s in storages(t):
                    self._add(s, category)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """New storages are activations in ``forward``, temporaries in ``backward`` and
        ``optimizer`` (until ``finish`` finds them to be gradients or optimizer state)."""
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = previous
            if name == "forward":
                self._forward_ends.append(self._events)

    def _transient(self, nbytes: int) -> None:
        """An allocation that lives only while one op runs."""
        record = _Record(self._rounded(nbytes), self._events + 1, self._events + 2, "temporary")
        self._events += 2
        if self._live + record.nbytes > self._peak:
            self._peak, self._peak_event = self._live + record.nbytes, record.born
            self._phase_at_peak = self._phase
        self._dead.append(record)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        forward = len(self._forward_ends) if self._phase == "forward" else None
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                for s in storages(t):
                    self._add(s, _PHASE_CATEGORY[self._phase], forward)
        workspace = self._op_workspaces.get(func)
        if workspace is not None:  # held inside the op, beside its outputs
            self._transient(workspace(*args, **(kwargs or {})))
        return out

    # ------------------------------------------------------------------ results

    def _category(self, record: _Record) -> str:
        """A forward-pass tensor freed before its forward pass ended was a temporary."""
        if record.category == "activations" and record.forward is not None and record.died is not None:
            ends = self._forward_ends
            if record.forward < len(ends) and record.died <= ends[record.forward]:
                return "temporary"
        return record.category

    def _recategorize(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        for t in tensors:
            for s in storages(t):
                record = self._records.get(s._cdata)
                if record is not None:
                    record.category = category

    def finish(self, model: Optional[torch.nn.Module] = None,
               optimizer: Optional[torch.optim.Optimizer] = None,
               gradients: Iterable[torch.Tensor] = ()) -> MemoryReport:
        """The bytes live at the peak, by category. Call it after the step, while the
        gradients (``gradients``, or the parameters' ``.grad``) and the optimizer state
        still exist, so that their storages can be recognized."""
        if model is not None:
            self._recategorize([p for p in model.parameters()] + list(model.buffers()), "parameters")
            gradients = list(gradients) + [p.grad for p in model.parameters() if p.grad is not None]
        self._recategorize(gradients, "gradients")
        if optimizer is not None:
            state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
            self._recategorize(state, "optimizer_state")
        by_category = dict.fromkeys(CATEGORIES, 0)
        for record in [*self._records.values(), *self._dead]:
            alive_at_peak = record.born <= self._peak_event and (record.died is None or record.died > self._peak_event)
            if alive_at_peak:
                by_category[self._category(record)] += record.nbytes
        return MemoryReport(self._peak, by_category, self._phase_at_peak)

"""Counting what ops do, without timing them: a dispatch mode that records every aten
(and custom) op with the bytes it reads and writes, and the host syncs it makes.

Used by the roofline report (``fastune.bench.roofline``) and by the tests that hold
the GPU paths to their byte and sync budgets on a CPU-only machine. It runs as well on
meta and fake tensors, so realistic shapes cost no memory.

Bytes are counted at op boundaries: every tensor argument is read once, every output
(or ``out=``/in-place argument) written once. What a kernel does inside (a second pass
over its input) is invisible here; ``roofline`` adds such passes from each kernel's own
accounting.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Ops that allocate without writing anything (nor reading their template).
_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
# In-place ops that overwrite ``self`` without reading it.
_WRITE_ONLY_SELF = {"copy_", "fill_", "zero_"}
# Ops that turn a device value into a host value: each one is a device sync on CUDA.
_SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal"}


@dataclasses.dataclass
class OpRecord:
    name: str  # aten overload packet name, e.g. "addmm" or "fastune::lora_linear"
    reads: list[torch.Tensor]
    writes: list[torch.Tensor]

    def bytes_read(self) -> int:
        return sum(_nbytes(t) for t in self.reads)

    def bytes_written(self) -> int:
        return sum(_nbytes(t) for t in self.writes)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _op_name(func) -> str:
    namespace = func.namespace
    name = func._schema.name.split("::")[-1]
    return name if namespace == "aten" else f"{namespace}::{name}"


class OpCounter(TorchDispatchMode):
    """Records every op dispatched while active (``records``), and the host syncs
    (``syncs``: ops that read a device value back to the host)."""

    def __init__(self):
        super().__init__()
        self.records: list[OpRecord] = []
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _op_name(func)
        if name in _SYNC_OPS:
            self.syncs.append(name)
        if func.namespace == "prim" or name in _ALLOCATIONS:  # no data moves
            return out
        reads, writes = [], []
        schema = func._schema
        bound = dict(zip((a.name for a in schema.arguments), args))
        bound.update(kwargs)
        for arg in schema.arguments:
            value = bound.get(arg.name)
            tensors = [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
            written = arg.alias_info is not None and arg.alias_info.is_write
            if written:
                writes += tensors
            # An out= argument is not read, nor the self of copy_ and fill_.
            if not (written and (arg.kwarg_only or name in _WRITE_ONLY_SELF)):
                reads += tensors
        aliased = any(r.alias_info is not None for r in schema.returns)
        if aliased and not writes:  # a view: no data moves
            reads = []
        if not aliased:
            writes += [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.records.append(OpRecord(name, reads, writes))
        return out

    def matching(self, names: Optional[set[str]] = None) -> list[OpRecord]:
        return [r for r in self.records if names is None or r.name in names]


class HostSyncs:
    """Counts the Tensor methods that read a value back to the host (each a device sync
    on CUDA), also inside opaque custom ops, where dispatch modes cannot see, and the
    explicit waits for the device (``torch.cuda.synchronize``, a stream's or an event's
    ``synchronize``): ``with HostSyncs() as syncs: ...; syncs.calls`` lists them by name."""

    METHODS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")
    # (owner, attribute, name in ``calls``) of the explicit device waits.
    WAITS = ((torch.cuda, "synchronize", "cuda.synchronize"),
             (torch.cuda.Stream, "synchronize", "Stream.synchronize"),
             (torch.cuda.Event, "synchronize", "Event.synchronize"))

    def __init__(self):
        self.calls: list[str] = []
        self._saved: list[tuple[object, str, object]] = []

    def __enter__(self):
        targets = [(torch.Tensor, name, name) for name in self.METHODS] + list(self.WAITS)
        for owner, attribute, label in targets:
            original = getattr(owner, attribute)
            self._saved.append((owner, attribute, original))

            def counted(*args, _label=label, _original=original, **kwargs):
                self.calls.append(_label)
                return _original(*args, **kwargs)

            setattr(owner, attribute, counted)
        return self

    def __exit__(self, *exc):
        for owner, attribute, original in reversed(self._saved):
            setattr(owner, attribute, original)
        self._saved.clear()
        return False

"""Trading compute or bandwidth for activation memory, and measuring peak memory.

- ``apply_activation_checkpointing(model, "full" | "selective")`` recomputes each
  decoder layer's activations in backward (full), or only its cheap element-wise
  ones (selective: matmul and attention outputs are kept, norms, RoPE, SiLU and
  products are recomputed).
- ``offload_activations(device)`` moves tensors saved for backward to pinned host
  memory on a side CUDA stream, once per storage, and brings them back in backward a
  layer ahead of need.
- ``peak_memory_stats(device)`` reports the CUDA allocator's peaks, or peak RSS on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import resource
import warnings
import weakref
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

import fastune.kernels  # noqa: F401 (registers the torch.ops.fastune ops named below)
from fastune.training.memory_tracker import storages

AC_MODES = ("full", "selective")

# Ops whose outputs selective checkpointing keeps: they cost FLOPs to recompute,
# while everything element-wise around them costs only bandwidth. fastune's fused LoRA
# ops are matmuls too, opaque to the policy's aten list: recomputing them would make
# "selective" cost what full checkpointing costs whenever the kernels are on.
_SAVE_OPS = {
    torch.ops.fastune.lora_linear.default,
    torch.ops.fastune.lora_mlp.default,
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _save_matmuls_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_save_matmuls_policy)


def _checkpointed(forward: Callable, selective: bool) -> Callable:
    context_fn = _selective_context if selective else None

    @functools.wraps(forward)
    def run(*args, **kwargs):
        extra = {"context_fn": context_fn} if context_fn else {}
        return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)

    return run


def apply_activation_checkpointing(model: nn.Module, mode: Optional[str | bool]) -> None:
    """Checkpoint every decoder layer of ``model.layers`` in place.

    The layer's ``forward`` is replaced on the instance instead of wrapping the module,
    so parameter names (and therefore checkpoint and PEFT keys) do not change.
    ``mode`` is ``"full"``, ``"selective"``, or falsy for nothing. Apply before compile.
    """
    if not mode:
        return
    if mode not in AC_MODES:
        raise ValueError(f"activation_checkpointing: expected one of {AC_MODES} or false, got {mode!r}")
    for layer in model.layers:
        layer.forward = _checkpointed(layer.forward, selective=mode == "selective")


class _WeightTest:
    """``is_weight(t)``: does a tensor saved for backward hold a weight? A parameter, a view
    of one (``nn.Linear`` saves ``weight.t()``), one of the model's parameter storages
    (an NF4 weight saves its packed inner tensors), or any tensor subclass.

    Under FSDP2 a layer's parameters are all-gathered into fresh storages before its
    forward (for NF4: new inner tensors); ``refresh(module)``, called at the start of a
    module's forward, adds the storages its parameters have then. They are held weakly:
    once FSDP frees a gathered buffer, its storage leaves the set."""

    def __init__(self, model: Optional[nn.Module]):
        self.storages: weakref.WeakSet = weakref.WeakSet()
        if model is not None:
            self.refresh(model)

    def refresh(self, module: nn.Module) -> None:
        self.storages.update(s for p in module.parameters() for s in storages(p))

    def __call__(self, t: torch.Tensor) -> bool:
        from torch.utils._python_dispatch import is_traceable_wrapper_subclass

        if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):
            return True
        return is_traceable_wrapper_subclass(t) or t.untyped_storage() in self.storages


def weight_detector(model: Optional[nn.Module]) -> Callable[[torch.Tensor], bool]:
    """A test for tensors saved for backward: does it hold one of ``model``'s weights?
    (See ``_WeightTest``.)"""
    return _WeightTest(model)


class _Streams:
    """The side stream, events and pinned host memory of CUDA; on another device the same
    calls do nothing (the work is then ordered by program order), so that the hooks'
    logic runs, and is tested, on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.side = torch.cuda.Stream(device) if self.cuda else None

    def compute(self):
        return torch.cuda.current_stream() if self.cuda else None

    def on_side(self):
        """Context: work issued inside runs on the side stream, after the compute
        stream's work issued so far (which produced what it copies)."""
        if not self.cuda:
            return contextlib.nullcontext()
        self.side.wait_stream(torch.cuda.current_stream())
        return torch.cuda.stream(self.side)

    def event(self):
        """An event recorded on the current stream (None off CUDA)."""
        if not self.cuda:
            return None
        done = torch.cuda.Event()
        done.record()
        return done

    def wait(self, event) -> None:
        """Make the current (compute) stream wait for ``event``."""
        if event is not None:
            torch.cuda.current_stream().wait_event(event)

    def keep_for(self, t: torch.Tensor, stream) -> None:
        """``t``'s memory must not be reused before ``stream`` has used it."""
        if stream is not None:
            t.record_stream(stream)


@dataclasses.dataclass(eq=False)  # identity: entries are found in lists
class _Offloaded:
    """One device storage, offloaded once however many saved tensors use it."""

    host: torch.Tensor  # uint8 copy of the whole storage
    device: torch.device
    group: int  # the last layer (forward order) that saved it
    pending: int = 0  # saved tensors still to be unpacked
    back: Optional[torch.Tensor] = None  # the storage on the device again (uint8)
    ready: Any = None  # event: ``back`` is filled


class _OffloadHooks:
    """Saved-tensor hooks that move activations to host memory and bring them back ahead
    of backward's need.

    pack (forward): a saved activation's storage is copied to (pinned) host memory on a
    side stream, ONCE per storage: the q/k/v projections all save the same input, gate
    and up the same one; a second consumer gets a handle to the same copy. The device
    memory is freed as soon as autograd's other references to it are gone.

    unpack (backward): the first tensor unpacked from layer g brings back, on the side
    stream, all of layer g (if not done yet) and all of layer g - 1, the one backward
    needs next: its copies overlap layer g's backward. The compute stream then waits
    only for the event of the storage it asks for.

    Layers are numbered by ``begin_layer``, called at the start of each decoder layer's
    forward. Weights (see ``weight_detector``) and storages under ``min_bytes`` stay on
    the device: the weights are resident anyway, and small copies cost more in launch
    latency than they save.
    """

    def __init__(self, device: torch.device, min_bytes: int, is_weight: Callable[[torch.Tensor], bool]):
        self.device = device
        self.min_bytes = min_bytes
        self.is_weight = is_weight
        self.streams = _Streams(device)
        self.log: list[tuple[str, int]] = []  # ("offload" | "fetch", group): for tests
        self.reset()

    def reset(self) -> None:
        self.group = 0
        self.by_storage: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.groups: dict[int, list[_Offloaded]] = {}
        self.started: set[int] = set()  # layers whose backward has begun
        self.log.clear()

    def begin_layer(self, module: nn.Module, args) -> None:
        self.group += 1
        refresh = getattr(self.is_weight, "refresh", None)
        if refresh is not None:
            refresh(module)  # its parameters, as FSDP2 has just gathered them

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        if (t.device.type != self.device.type or storage.nbytes() < self.min_bytes
                or self.is_weight(t)):
            return t
        entry = self.by_storage.get(storage)
        if entry is None:
            entry = self._offload(storage)
            self.by_storage[storage] = entry
        elif entry.group != self.group:
            # Saved again by a later layer (RoPE's cos/sin by every layer): backward needs
            # it first there, so it comes back with that layer.
            self.groups[entry.group].remove(entry)
            entry.group = self.group
            self.groups.setdefault(self.group, []).append(entry)
        entry.pending += 1
        return (entry, t.dtype, t.storage_offset(), t.size(), t.stride())

    def _offload(self, storage: torch.UntypedStorage) -> _Offloaded:
        device_bytes = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
        with self.streams.on_side():
            host = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=self.streams.cuda)
            host.copy_(device_bytes, non_blocking=True)
        # The storage must not be reused by the compute stream before the copy has read it.
        self.streams.keep_for(device_bytes, self.streams.side)
        entry = _Offloaded(host, storage.device, self.group)
        self.groups.setdefault(self.group, []).append(entry)
        self.log.append(("offload", self.group))
        return entry

    def _fetch(self, group: int) -> None:
        """Bring a layer's storages back on the side stream (each once)."""
        todo = [e for e in self.groups.get(group, ()) if e.back is None]
        if not todo:
            return
        self.log.append(("fetch", group))
        # On the side stream, after the copies to the host issued there in forward.
        with self.streams.on_side():
            for entry in todo:
                entry.back = entry.host.to(entry.device, non_blocking=True)
                entry.ready = self.streams.event()

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        entry, dtype, offset, size, stride = packed
        if entry.back is None:
            self._fetch(entry.group)
        if entry.group not in self.started:  # backward has reached this layer
            self.started.add(entry.group)
            earlier = [g for g in self.groups if g < entry.group]
            if earlier:  # the layer backward needs next: its copies overlap this one's
                self._fetch(max(earlier))
        self.streams.wait(entry.ready)
        back = entry.back
        # Allocated on the side stream, used on the compute stream from here on.
        self.streams.keep_for(back, self.streams.compute())
        entry.pending -= 1
        if entry.pending == 0:
            # Autograd holds what it still needs; the host copy stays while autograd holds
            # the handles (a retained graph unpacks again).
            entry.back = None
        return torch.empty(0, dtype=dtype, device=back.device).set_(
            back.untyped_storage(), offset, size, stride)


class _Offloading:
    """The context manager ``offload_activations`` returns: installs the hooks for one
    forward (re-entered every micro-batch), and numbers the decoder layers."""

    def __init__(self, hooks: _OffloadHooks, model: Optional[nn.Module]):
        self.hooks = hooks
        self._context = None
        if model is not None:
            # Disabled for dynamo: a compiled layer runs this hook eagerly (a graph break
            # at the layer's start) instead of tracing storage bookkeeping.
            begin = torch._dynamo.disable(hooks.begin_layer)
            for layer in getattr(model, "layers", ()):
                layer.register_forward_pre_hook(lambda m, a: begin(m, a) if self._context else None)

    def __enter__(self):
        self.hooks.reset()
        self._context = torch.autograd.graph.saved_tensors_hooks(self.hooks.pack, self.hooks.unpack)
        self._context.__enter__()
        return self

    def __exit__(self, *exc):
        context, self._context = self._context, None
        return context.__exit__(*exc)


def offload_activations(device: torch.device, enabled: bool = True, min_bytes: int = 1 << 20,
                        model: Optional[nn.Module] = None):
    """Context manager for the forward pass: offload saved activations (not ``model``'s
    weights) to the CPU, and prefetch them a layer ahead in backward (see _OffloadHooks).

    On a non-CUDA device there is nowhere cheaper to put them: warns once and does nothing.
    """
    if not enabled:
        return contextlib.nullcontext()
    if device.type != "cuda":
        warnings.warn(
            f"activation_offloading: only useful on CUDA; doing nothing on {device.type}",
            stacklevel=2,
        )
        return contextlib.nullcontext()
    return _Offloading(_OffloadHooks(device, min_bytes, weight_detector(model)), model)


def peak_memory_stats(device: torch.device) -> dict[str, float]:
    """Peak memory in GiB. On CUDA the allocator's peaks since the last reset:
    active (live tensors), alloc(ated) and reserved (held by the caching allocator).
    Elsewhere the process's peak resident set size since start (``ru_maxrss``, KiB on Linux).
    """
    gib = 1024**3
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        return {
            "peak_memory_active": stats["active_bytes.all.peak"] / gib,
            "peak_memory_alloc": torch.cuda.max_memory_allocated(device) / gib,
            "peak_memory_reserved": torch.cuda.max_memory_reserved(device) / gib,
        }
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gib}

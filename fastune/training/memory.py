"""Trading compute or bandwidth for activation memory, and measuring peak memory.

- ``apply_activation_checkpointing(model, "full" | "selective")`` recomputes each
  decoder layer's activations in backward (full), or only its cheap element-wise
  ones (selective: matmul and attention outputs are kept, norms, RoPE, SiLU and
  products are recomputed).
- ``offload_activations(device)`` moves tensors saved for backward to pinned host
  memory on a side CUDA stream and brings them back in backward.
- ``peak_memory_stats(device)`` reports the CUDA allocator's peaks, or peak RSS on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import resource
import warnings
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

AC_MODES = ("full", "selective")

# Ops whose outputs selective checkpointing keeps: they cost FLOPs to recompute,
# while everything element-wise around them costs only bandwidth.
_SAVE_OPS = {
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


def weight_detector(model: Optional[nn.Module]) -> Callable[[torch.Tensor], bool]:
    """A test for tensors saved for backward: does it hold a weight? A parameter, a view
    of one (``nn.Linear`` saves ``weight.t()``), one of ``model``'s parameter storages
    (an NF4 weight saves its packed inner tensors), or any tensor subclass."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    from fastune.training.memory_tracker import storages

    weight_storages = {s._cdata for p in (model.parameters() if model is not None else ())
                       for s in storages(p)}

    def is_weight(t: torch.Tensor) -> bool:
        if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):
            return True
        return is_traceable_wrapper_subclass(t) or t.untyped_storage()._cdata in weight_storages

    return is_weight


class _OffloadHooks:
    """pack: copy a saved CUDA activation to pinned host memory on a side stream, so the
    copy overlaps compute and the device copy is freed as soon as autograd drops it.
    unpack: make the compute stream wait for that copy, then copy back (asynchronous for
    the host; the pinned allocator keeps the host buffer alive until the copy is done).

    Weights (see ``weight_detector``) and tensors under ``min_bytes`` stay on the device:
    the weights are resident anyway, and small copies cost more in launch latency than
    they save.
    """

    def __init__(self, min_bytes: int, is_weight: Callable[[torch.Tensor], bool]):
        self.min_bytes = min_bytes
        self.is_weight = is_weight
        self.stream = torch.cuda.Stream()

    def pack(self, t: torch.Tensor):
        if not t.is_cuda or t.numel() * t.element_size() < self.min_bytes or self.is_weight(t):
            return t
        compute = torch.cuda.current_stream()
        self.stream.wait_stream(compute)  # t is produced on the compute stream
        with torch.cuda.stream(self.stream):
            # empty_like keeps t's strides: some backward formulas rely on them.
            host = torch.empty_like(t, device="cpu", pin_memory=True)
            host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        # t's memory must not be reused by the compute stream before the copy has read it.
        t.record_stream(self.stream)
        return (t.device, host, done)

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host, done = packed
        torch.cuda.current_stream().wait_event(done)
        return host.to(device, non_blocking=True)


def offload_activations(device: torch.device, enabled: bool = True, min_bytes: int = 1 << 20,
                        model: Optional[nn.Module] = None):
    """Context manager for the forward pass: offload saved activations (not ``model``'s
    weights) to the CPU.

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
    hooks = _OffloadHooks(min_bytes, weight_detector(model))
    return torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack)


def reset_peak_memory_stats(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


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

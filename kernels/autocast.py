"""The fused ops ignore autocast: each computes in the dtypes of its inputs, inside an
``autocast`` region exactly as outside it.

Why: an op mixes matmuls written with ``out=`` (which autocast never touches) and
plain ones (which it casts), so under autocast its result would depend on the path
(Triton or reference) and even on the chunking (one chunk or several). The model's
dtype policy decides the inputs' dtypes; autocast does not reach inside an op.

The rule, applied with ``no_autocast``: every public op function and every backward
registered for a custom op runs with autocast off for its tensors' device type. A
caller under autocast that wants the op in a lower precision casts the inputs.
Backward belongs outside the autocast region (as PyTorch's autocast documentation
says): the reference paths' native backward formulas follow the forward's dtypes
there, and the custom ops' backwards are off even when called inside.
"""

from __future__ import annotations

import contextlib
import functools

import torch


def _device_type(args) -> str | None:
    """The device type of the first tensor among ``args`` (lists of tensors included)."""
    for arg in args:
        if isinstance(arg, (list, tuple)):
            found = _device_type(arg)
            if found is not None:
                return found
        elif isinstance(arg, torch.Tensor):
            return arg.device.type
    return None


def autocast_off(*tensors) -> contextlib.AbstractContextManager:
    """Autocast off for the device type of the first of ``tensors``; nothing to turn off
    for a device type without autocast (meta)."""
    device_type = _device_type(tensors)
    if device_type is None or not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def no_autocast(fn):
    """``fn`` run with autocast off for the device of its first tensor argument."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with autocast_off(*args, *kwargs.values()):
            return fn(*args, **kwargs)

    return wrapper

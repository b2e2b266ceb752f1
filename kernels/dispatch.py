"""Which implementation an op runs: the Triton kernel or the PyTorch reference.

CUDA tensors take the Triton path. Everything else takes the reference path,
which inductor fuses on CPU. Tests force the Triton path on CPU under
``TRITON_INTERPRET=1`` with ``force_triton()`` (or ``FASTUNE_FORCE_TRITON=1``).
"""

from __future__ import annotations

import contextlib
import os

import torch

_force_triton: bool = os.environ.get("FASTUNE_FORCE_TRITON", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """True when ``t`` should go through the Triton kernel."""
    return t.is_cuda or _force_triton


@contextlib.contextmanager
def force_triton(enabled: bool = True):
    """Force (or forbid, with ``enabled=False``) the Triton path for non-CUDA tensors."""
    global _force_triton
    previous, _force_triton = _force_triton, enabled
    try:
        yield
    finally:
        _force_triton = previous

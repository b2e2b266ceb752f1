"""torch.compile applied the torchtitan way: per decoder layer, plus the loss.

Compiling each layer separately (rather than the whole model) keeps compile time
to one layer's graph, reused by every layer of the same shape, and leaves the
Python loop over layers (with activation checkpointing and offloading around
it) in eager mode. ``nn.Module.compile()`` compiles in place, so parameter names
keep no ``_orig_mod.`` prefix.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def apply_compile(model: nn.Module, loss_fn: Callable) -> Callable:
    """Compile every layer of ``model.layers`` in place and return the compiled loss.

    Apply after activation checkpointing, so that recomputation happens inside the
    compiled region.
    """
    for layer in model.layers:
        layer.compile()
    return torch.compile(loss_fn)

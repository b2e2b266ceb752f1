"""A static key/value cache for generation (gpt-fast style).

Each attention layer gets preallocated buffers ``k`` and ``v`` of shape
``[batch, kv_heads, max_seq_len, head_dim]``. A forward pass writes the keys and
values of its tokens at their cache positions (``input_pos``) and attends over the
whole buffer, with a mask that hides the positions not written yet. Every decode
step therefore sees tensors of the same shapes, which is what lets
``torch.compile`` build the decode step once (and CUDA graphs replay it).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


class KVCache(nn.Module):
    """One layer's ``k`` and ``v`` [batch, kv_heads, max_seq_len, head_dim]: contiguous
    views at the start of flat buffers, which ``resize`` reuses for any cache that fits
    (a ``Generator`` keeps its caches across calls, so a compiled or CUDA-graphed decode
    step always sees the same memory) and grows, never shrinks, for a larger one."""

    def __init__(self, batch_size: int, num_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: Optional[torch.device] = None):
        super().__init__()
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self._flat: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.register_buffer("k", None, persistent=False)
        self.register_buffer("v", None, persistent=False)
        self.resize(batch_size, max_seq_len, dtype, device)

    def resize(self, batch_size: int, max_seq_len: int, dtype: torch.dtype,
               device: Optional[torch.device] = None) -> None:
        shape = (batch_size, self.num_kv_heads, max_seq_len, self.head_dim)
        numel = math.prod(shape)
        flat = self._flat
        if flat is None or flat[0].numel() < numel or flat[0].dtype != dtype \
                or flat[0].device != torch.device(device or "cpu"):
            self._flat = flat = None  # the old buffers go before the new ones come
            self.k = self.v = None
            # Zeros, not empty: masked positions still enter attention's product with
            # weight 0, and 0 * NaN from uninitialized memory would be NaN.
            flat = self._flat = tuple(torch.zeros(numel, dtype=dtype, device=device) for _ in "kv")
        self.k = flat[0][:numel].view(shape)
        self.v = flat[1][:numel].view(shape)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` ([B, Hk, S, D]) at positions ``input_pos`` ([S]); return the whole buffers."""
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


def setup_kv_caches(model: nn.Module, batch_size: int, max_seq_len: int,
                    dtype: Optional[torch.dtype] = None) -> None:
    """Give every attention layer of ``model`` a fresh cache (dtype and device of the
    embedding unless ``dtype`` is given). The model then needs ``input_pos`` and an
    explicit ``mask`` in every forward, until ``clear_kv_caches``."""
    weight = model.embed_tokens.weight
    dtype = dtype or weight.dtype
    for layer in model.layers:
        attn = layer.self_attn
        attn.kv_cache = KVCache(batch_size, attn.num_kv_heads, max_seq_len, attn.head_dim, dtype, weight.device)


def clear_kv_caches(model: nn.Module) -> None:
    """Drop the caches (freeing their memory); the model is back to training-style forwards."""
    for layer in model.layers:
        layer.self_attn.kv_cache = None


def cache_mask(valid: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """The boolean SDPA mask [B, 1, S, L] for queries at cache positions ``input_pos`` ([S])
    over a cache of length L, where ``valid`` [B, L] is False at left-padding positions.

    Query i may see key j iff j <= i (causal; also hides positions not written yet)
    and both are padding or both are real tokens. Real tokens never see padding; a
    padding query sees earlier padding, so that no row of the mask is empty (an empty
    row makes SDPA produce NaN, which would then reach real rows through 0 * NaN).
    """
    length = valid.shape[1]
    key_pos = torch.arange(length, device=valid.device)
    causal = key_pos[None, :] <= input_pos[:, None]  # [S, L]
    same_kind = valid[:, None, :] == valid[:, input_pos][:, :, None]  # [B, S, L]
    return (causal[None] & same_kind)[:, None]

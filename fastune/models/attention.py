"""Causal attention for the decoder, with packed documents, sliding windows and
logit softcapping, and no dense [B, 1, S, S] mask in training.

``AttentionMasks.build(...)`` runs once per forward (in ``Transformer.forward``) and
prepares what every layer needs; each layer then calls
``attend(q, k, v, layer, masks)`` with its own ``LayerAttention`` (window, softcap).

Dispatch rule, first match wins:

1. **Explicit mask** (generation with a KV cache, ``mask=`` given): SDPA with that
   boolean mask [B, 1, S, L], ANDed once per forward with each distinct window on
   cache positions. It is decoding's own [S, L] mask, not a training mask.
2. **Plain causal** (no document ids, no window, no softcap): SDPA with
   ``is_causal=True``, the flash / memory-efficient kernels' fast path.
3. **CUDA**: FlexAttention (``torch.nn.attention.flex_attention``, compiled to a fused
   Triton kernel), with one ``BlockMask`` per distinct window (causal, same document,
   inside the window) built once per forward, and the softcap as a ``score_mod``.
4. **CPU, no softcap**: ``document_attention`` (``document_attention.py``), query
   blocks of ``BLOCK`` rows, each against only the keys its queries can see in any
   batch row (from the first key of their documents and window to the block's last
   row), by ATen's CPU flash kernel with a [B, 1, BLOCK, keys] mask.
5. **Anywhere else** (a softcap on CPU, other devices): query blocks of ``BLOCK`` rows,
   each against the keys from its window's start (or 0) to its last row, with a
   [B, 1, BLOCK, keys] mask per block.

FlexAttention does run on CPU here (torch 2.13), but not for training: eagerly it
materializes the whole [B, H, S, S] score matrix (worse than the mask it replaces), and
compiled it has no backward on CPU ("FlexAttention does not support backward on CPU"),
so CPU takes path 4 or 5.

``fastune plan`` traces a GPU step on fake CPU tensors, where rules 4 and 5 would
count CPU kernels (path 5's per-block scores); under ``planning_cuda_memory()`` every layer takes
SDPA's flash kernel instead, which saves what FlexAttention saves (the output and the
log-sum-exp, no [S, S] scores). Only the memory is meant; the values are not Gemma's.

Conventions follow transformers 5: a sliding window of W lets query i see keys j
with i - W < j <= i (W keys, itself included); the softcap is
``cap * tanh(score / cap)`` applied to the scaled scores, before masking.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from fastune.models.document_attention import document_attention

# Query rows per block of paths 4 and 5. Path 4, fwd + bwd of one layer at the training
# benchmark's shape (B 4, S 512, 8 heads, 2 KV heads, D 64, random documents of 20-70 tokens),
# fp32: 41 ms at 64 rows, 59 at 128 on one thread; 23 and 32 ms on two. Path 5 at that
# shape, one thread: 86 ms at 128 rows, the same at 64.
BLOCK = 64
_planning_cuda_memory = False


@contextlib.contextmanager
def planning_cuda_memory() -> Iterator[None]:
    """For the memory planner only: every layer's attention holds, in forward and for
    backward, what CUDA's FlexAttention holds (see the module docstring)."""
    global _planning_cuda_memory
    previous, _planning_cuda_memory = _planning_cuda_memory, True
    try:
        yield
    finally:
        _planning_cuda_memory = previous


@dataclasses.dataclass(frozen=True)
class LayerAttention:
    """One layer's attention settings (``ModelConfig.layer_attention(i)``)."""

    sliding_window: Optional[int] = None  # W: query i sees keys i-W+1 .. i
    softcap: Optional[float] = None  # scores -> softcap * tanh(scores / softcap)
    scale: Optional[float] = None  # of q.k; None: 1/sqrt(head_dim) (Gemma: query_pre_attn_scalar)

    @property
    def plain(self) -> bool:
        return self.sliding_window is None and self.softcap is None


@dataclasses.dataclass
class AttentionMasks:
    """What the layers of one forward share: document ids, or the explicit masks of
    generation, or FlexAttention block masks, each keyed by window (None: no window)."""

    document_ids: Optional[torch.Tensor] = None  # [B, S]
    explicit: Optional[dict] = None  # window -> bool [B, 1, S, L] (KV-cache path)
    block_masks: Optional[dict] = None  # window -> BlockMask (CUDA path)

    @classmethod
    def build(cls, layers: list[LayerAttention], batch: int, seqlen: int, device: torch.device,
              document_ids: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
              input_pos: Optional[torch.Tensor] = None) -> "AttentionMasks":
        windows = sorted({layer.sliding_window for layer in layers}, key=lambda w: (w is not None, w or 0))
        if mask is not None:
            return cls(explicit={w: _windowed(mask, w, input_pos) for w in windows})
        if device.type == "cuda" and any(document_ids is not None or not layer.plain for layer in layers):
            return cls(document_ids, block_masks={w: _block_mask(document_ids, w, batch, seqlen, device)
                                                  for w in windows})
        return cls(document_ids)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: LayerAttention,
           masks: AttentionMasks) -> torch.Tensor:
    """Causal attention of q [B, H, S, D] over k, v [B, Hk, L, D] (L = S except with a KV
    cache); H a multiple of Hk (grouped-query). Returns [B, H, S, D]."""
    gqa = q.shape[1] != k.shape[1]
    if masks.explicit is not None:
        mask = masks.explicit[layer.sliding_window]
        if layer.softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, scale=layer.scale)
        return _softcapped(q, k, v, mask, layer.softcap, layer.scale)
    if _planning_cuda_memory or (masks.document_ids is None and layer.plain):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, scale=layer.scale)
    if masks.block_masks is not None:
        return _flex(q, k, v, masks.block_masks[layer.sliding_window], layer.softcap, gqa, layer.scale)
    if q.device.type == "cpu" and layer.softcap is None:
        return document_attention(q, k, v, masks.document_ids, layer.sliding_window, BLOCK, layer.scale)
    return blocked_attention(q, k, v, masks.document_ids, layer.sliding_window, layer.softcap, BLOCK,
                             layer.scale)


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document_ids: Optional[torch.Tensor],
                      window: Optional[int], softcap: Optional[float], block: int,
                      scale: Optional[float] = None) -> torch.Tensor:
    """Path 5: queries in blocks of ``block`` rows; a block attends to keys from the
    start of its window (or 0) to its last row, masked causally, by window and by
    document. No tensor spans [S, S] unless S <= block."""
    seqlen = q.shape[2]
    gqa = q.shape[1] != k.shape[1]
    pos = torch.arange(seqlen, device=q.device)
    outs = []
    for start in range(0, seqlen, block):
        end = min(start + block, seqlen)
        first = 0 if window is None else max(0, start - window + 1)
        qpos, kpos = pos[start:end, None], pos[None, first:end]
        keep = kpos <= qpos
        if window is not None:
            keep = keep & (qpos - kpos < window)
        keep = keep[None, None]  # [1, 1, rows, keys]
        if document_ids is not None:
            keep = keep & (document_ids[:, None, start:end, None] == document_ids[:, None, None, first:end])
        qb, kb, vb = q[:, :, start:end], k[:, :, first:end], v[:, :, first:end]
        if softcap is None:
            outs.append(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=keep, enable_gqa=gqa, scale=scale))
        else:
            outs.append(_softcapped(qb, kb, vb, keep, softcap, scale))
    return torch.cat(outs, dim=2)


def _softcapped(q, k, v, keep: torch.Tensor, softcap: float, scale: Optional[float] = None) -> torch.Tensor:
    """Attention with ``softcap * tanh(scores / softcap)``, softmax in fp32 (as HF's eager
    path). Grouped-query heads are folded into the rows, not repeated."""
    bsz, heads, rows, dim = q.shape
    kv_heads = k.shape[1]
    qg = q.reshape(bsz, kv_heads, heads // kv_heads * rows, dim)
    scores = (qg @ k.transpose(-1, -2)) * (dim ** -0.5 if scale is None else scale)
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores.view(bsz, kv_heads, heads // kv_heads, rows, -1)
    scores = scores.masked_fill(~keep.view(keep.shape[0], 1, 1, rows, -1), float("-inf"))
    probs = scores.float().softmax(-1).to(q.dtype).view(bsz, kv_heads, heads // kv_heads * rows, -1)
    return (probs @ v).view(bsz, heads, rows, dim)


def _windowed(mask: torch.Tensor, window: Optional[int], input_pos: torch.Tensor) -> torch.Tensor:
    """The generation mask [B, 1, S, L] restricted to keys inside the window of each query
    (cache positions: left padding shifts a row's queries and keys alike)."""
    if window is None:
        return mask
    key_pos = torch.arange(mask.shape[-1], device=mask.device)
    return mask & (input_pos[:, None] - key_pos[None, :] < window)


def _block_mask(document_ids: Optional[torch.Tensor], window: Optional[int], batch: int, seqlen: int,
                device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        keep = q_idx >= kv_idx
        if document_ids is not None:
            keep = keep & (document_ids[b, q_idx] == document_ids[b, kv_idx])
        if window is not None:
            keep = keep & (q_idx - kv_idx < window)
        return keep

    rows = batch if document_ids is not None else None  # one mask for every row otherwise
    return create_block_mask(mask_mod, rows, None, seqlen, seqlen, device=device)


_COMPILED_FLEX = None


def _flex(q, k, v, block_mask, softcap: Optional[float], gqa: bool, scale: Optional[float] = None) -> torch.Tensor:
    """FlexAttention through ``torch.compile`` (eager flex attention is the unfused
    reference). Under an outer ``torch.compile`` the call is traced inline."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    flex = _COMPILED_FLEX if q.is_cuda else flex_attention
    score_mod = None
    if softcap is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return softcap * torch.tanh(score / softcap)
    return flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=gqa)

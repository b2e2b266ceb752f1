"""Causal attention over packed documents on the CPU, computing only the keys a block
of queries can see.

A packed training row holds many documents, and a query attends only to the earlier
keys of its own document (and of its sliding window, if any). The rows of the row
``b`` are split into blocks of ``block`` queries, s0 <= i < e, and each block attends
to the keys

    first .. e - 1,   first = max(min_{s0 <= i < e} doc_first[b, i], s0 - W + 1)

where doc_first[b, i] is the first position of the document of i (the first position
with i's document id) and W the window (no term without one). No query of the block
can see a key before ``first``, nor (causally) after e - 1. Inside that range an additive
[rows, keys] mask keeps j <= i, same document and i - j < W. With the training
benchmark's packing (documents of 20 to 70 tokens in rows of 512) that is about a
sixth of the keys of the blocked SDPA path, which starts every block at key 0.

Per block the math is SDPA's, out = softmax(scale q kᵀ + mask) v, by ATen's CPU flash
kernel (``_scaled_dot_product_flash_attention_for_cpu``), which takes grouped-query
heads as they are and returns the row log-sum-exp; the backward is that kernel's
backward from the saved output and log-sum-exp, so nothing [S, S] is kept. dK and dV
of overlapping key ranges are summed in fp32 (float64 for float64 inputs).

The key ranges depend on the data, which torch.compile would specialize on (or break
the graph at), so each direction is one opaque custom op: the per-layer compiled graph
calls ``fastune::document_attention`` and its backward like any ATen op, and a fake
tensor pass (the memory planner) sees what the real op saves: q, k, v, the output and
the log-sum-exp.
"""

from __future__ import annotations

from typing import Optional

import torch

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The flash kernel's accumulation dtype (its log-sum-exp's): fp32, or float64."""
    return torch.promote_types(dtype, torch.float32)


def document_first(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] -> [B, S]: for each position, the first position with its document id
    (the start of its document when documents are contiguous, as packing writes them)."""
    seqlen = document_ids.shape[-1]
    ids, order = document_ids.sort(dim=-1, stable=True)
    pos = torch.arange(seqlen, device=document_ids.device).expand_as(ids)
    group_start = torch.ones_like(ids, dtype=torch.bool)
    group_start[:, 1:] = ids[:, 1:] != ids[:, :-1]
    # The stable sort puts each id's first position at the start of its group.
    first_sorted = order.gather(-1, torch.where(group_start, pos, 0).cummax(-1).values)
    return torch.empty_like(order).scatter_(-1, order, first_sorted)


def key_ranges(document_ids: Optional[torch.Tensor], batch: int, seqlen: int, block: int,
               window: Optional[int]) -> list[tuple[slice, int, int, int]]:
    """(batch rows, s0, e, first) per query block: queries s0..e-1 of those rows attend
    to keys first..e-1 (module docstring). Without documents every row shares its blocks."""
    starts = range(0, seqlen, block)
    if document_ids is None:
        firsts = [[0] * len(starts)]
        rows = [slice(0, batch)]
    else:
        first = document_first(document_ids)
        pad = -seqlen % block
        if pad:
            first = torch.cat([first, first[:, -1:].expand(-1, pad)], dim=-1)
        firsts = first.view(batch, -1, block).amin(-1).tolist()
        rows = [slice(b, b + 1) for b in range(batch)]
    out = []
    for row, row_firsts in zip(rows, firsts):
        for s0, first in zip(starts, row_firsts):
            if window is not None:
                first = max(first, s0 - window + 1)
            out.append((row, s0, min(s0 + block, seqlen), first))
    return out


def _block_mask(document_ids: Optional[torch.Tensor], row: slice, s0: int, e: int, first: int,
                window: Optional[int], dtype: torch.dtype) -> torch.Tensor:
    """The additive [rows or 1, 1, e - s0, e - first] mask of one block: 0 where query i
    sees key j (j <= i, same document, inside the window), -inf elsewhere."""
    device = document_ids.device if document_ids is not None else None
    qpos = torch.arange(s0, e, device=device)[:, None]
    kpos = torch.arange(first, e, device=device)[None, :]
    keep = kpos <= qpos
    if window is not None:
        keep = keep & (qpos - kpos < window)
    keep = keep[None, None]
    if document_ids is not None:
        ids = document_ids[row]
        keep = keep & (ids[:, None, s0:e, None] == ids[:, None, None, first:e])
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))


@torch.library.custom_op("fastune::document_attention", mutates_args=(), device_types="cpu")
def _document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        document_ids: Optional[torch.Tensor], block: int, window: Optional[int],
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, seqlen, _ = q.shape
    out = torch.empty_like(q)
    lse = q.new_empty((batch, heads, seqlen), dtype=_accumulate_dtype(q.dtype))
    for row, s0, e, first in key_ranges(document_ids, batch, seqlen, block, window):
        mask = _block_mask(document_ids, row, s0, e, first, window, q.dtype)
        o, block_lse = _FLASH(q[row, :, s0:e], k[row, :, first:e], v[row, :, first:e], 0.0, False,
                              attn_mask=mask, scale=scale)
        out[row, :, s0:e] = o
        lse[row, :, s0:e] = block_lse
    return out, lse


@_document_attention.register_fake
def _(q, k, v, document_ids, block, window, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=_accumulate_dtype(q.dtype))


@torch.library.custom_op("fastune::document_attention_backward", mutates_args=(), device_types="cpu")
def _document_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                 v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                 document_ids: Optional[torch.Tensor], block: int,
                                 window: Optional[int], scale: float
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, _, seqlen, _ = q.shape
    grad_q = torch.empty_like(q)
    # Blocks share keys: their dK, dV are summed in fp32, rounded once at the end.
    grad_k = torch.zeros_like(k, dtype=_accumulate_dtype(k.dtype))
    grad_v = torch.zeros_like(v, dtype=_accumulate_dtype(v.dtype))
    for row, s0, e, first in key_ranges(document_ids, batch, seqlen, block, window):
        mask = _block_mask(document_ids, row, s0, e, first, window, q.dtype)
        dq, dk, dv = _FLASH_BACKWARD(grad_out[row, :, s0:e], q[row, :, s0:e], k[row, :, first:e],
                                     v[row, :, first:e], out[row, :, s0:e], lse[row, :, s0:e], 0.0,
                                     False, attn_mask=mask, scale=scale)
        grad_q[row, :, s0:e] = dq
        grad_k[row, :, first:e] += dk
        grad_v[row, :, first:e] += dv
    return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype)


@_document_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, document_ids, block, window, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, document_ids, block, window, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, document_ids)
    ctx.settings = (block, window, scale)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, document_ids = ctx.saved_tensors
    grad_q, grad_k, grad_v = _document_attention_backward(grad_out, q, k, v, out, lse, document_ids,
                                                          *ctx.settings)
    return grad_q, grad_k, grad_v, None, None, None, None


_document_attention.register_autograd(_backward, setup_context=_setup_context)


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       document_ids: Optional[torch.Tensor], window: Optional[int], block: int,
                       scale: Optional[float] = None) -> torch.Tensor:
    """Causal attention of q [B, H, S, D] over k, v [B, Hk, S, D] (H a multiple of Hk),
    within documents (``document_ids`` [B, S], or None: one per row) and the sliding
    ``window`` (None: none), on the CPU. Returns [B, H, S, D]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _document_attention(q, k, v, document_ids, block, window, scale)[0]

"""Causal attention over packed documents on the CPU, computing only the keys a block
of queries can see.

A packed training row holds many documents, and a query attends only to the earlier
keys of its own document (and of its sliding window, if any). The positions are split
into blocks of ``block`` queries, s0 <= i < e, and each block attends, in every row at
once, to the keys

    first .. e - 1,   first = max(min_{b, s0 <= i < e} doc_first[b, i], s0 - W + 1)

where doc_first[b, i] is the first position with the document id of (b, i) and W the
window (no term without one). No query of the block can see a key before ``first``,
nor (causally) after e - 1. Inside that range an additive [B, 1, rows, keys] mask keeps
j <= i, same document and i - j < W. With random documents of 20 to 70 tokens packed in
4 rows of 512 (the training benchmark's demo documents are shorter still), the blocks
hold 31% of the query-key pairs of the blocked SDPA path in 128-row blocks, which
starts every block at key 0.

The minimum over rows, rather than a range per row, is measured: fwd + bwd of one layer
at that shape (8 heads, 2 KV heads, D 64), fp32, 64-row blocks: 41 ms against 44 ms per
row on one thread, 23 against 33 ms on two (a call per row halves the kernel's
parallel work).

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


def key_ranges(document_ids: Optional[torch.Tensor], seqlen: int, block: int,
               window: Optional[int]) -> list[tuple[int, int, int]]:
    """(s0, e, first) per query block: queries s0..e-1 of every row attend to keys
    first..e-1 (module docstring)."""
    starts = range(0, seqlen, block)
    firsts = [0] * len(starts)
    if document_ids is not None:
        first = document_first(document_ids).amin(0)
        first = torch.cat([first, first[-1:].expand(-seqlen % block)])
        firsts = first.view(-1, block).amin(-1).tolist()
    return [(s0, min(s0 + block, seqlen), first if window is None else max(first, s0 - window + 1))
            for s0, first in zip(starts, firsts)]


def _block_mask(document_ids: Optional[torch.Tensor], s0: int, e: int, first: int,
                window: Optional[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The additive [B or 1, 1, e - s0, e - first] mask of one block: 0 where query i
    sees key j (j <= i, same document, inside the window), -inf elsewhere."""
    qpos = torch.arange(s0, e, device=device)[:, None]
    kpos = torch.arange(first, e, device=device)[None, :]
    keep = kpos <= qpos
    if window is not None:
        keep = keep & (qpos - kpos < window)
    keep = keep[None, None]
    if document_ids is not None:
        keep = keep & (document_ids[:, None, s0:e, None] == document_ids[:, None, None, first:e])
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, float("-inf"))


@torch.library.custom_op("fastune::document_attention", mutates_args=(), device_types="cpu")
def _document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        document_ids: Optional[torch.Tensor], block: int, window: Optional[int],
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, seqlen, _ = q.shape
    out = torch.empty_like(q)
    lse = q.new_empty((batch, heads, seqlen), dtype=_accumulate_dtype(q.dtype))
    for s0, e, first in key_ranges(document_ids, seqlen, block, window):
        mask = _block_mask(document_ids, s0, e, first, window, q.dtype, q.device)
        out[:, :, s0:e], lse[:, :, s0:e] = _FLASH(q[:, :, s0:e], k[:, :, first:e], v[:, :, first:e], 0.0,
                                                  False, attn_mask=mask, scale=scale)
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
    seqlen = q.shape[2]
    grad_q = torch.empty_like(q)
    # Blocks share keys: their dK, dV are summed in the accumulation dtype, rounded once.
    grad_k = torch.zeros_like(k, dtype=_accumulate_dtype(k.dtype))
    grad_v = torch.zeros_like(v, dtype=_accumulate_dtype(v.dtype))
    for s0, e, first in key_ranges(document_ids, seqlen, block, window):
        mask = _block_mask(document_ids, s0, e, first, window, q.dtype, q.device)
        grad_q[:, :, s0:e], dk, dv = _FLASH_BACKWARD(
            grad_out[:, :, s0:e], q[:, :, s0:e], k[:, :, first:e], v[:, :, first:e], out[:, :, s0:e],
            lse[:, :, s0:e], 0.0, False, attn_mask=mask, scale=scale)
        grad_k[:, :, first:e] += dk
        grad_v[:, :, first:e] += dv
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

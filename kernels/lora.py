"""LoRA linear: a frozen base weight plus a trainable rank-r update, in one op.

With x [N, in], frozen W [out, in] (dense, or a torchao NF4Tensor), A [r, in],
B [out, r], scale s and an optional bias b [out]:

    forward    xa = x·Aᵀ                              [N, r]
               y  = x·Wᵀ + b + s·xa·Bᵀ                 [N, out], one buffer:
                                                       the low-rank term is added
                                                       in place (addmm_, beta=1)
    backward   dyB = dy·B                              [N, r]
               dx  = dy·W + s·dyB·A                    [N, in], again one buffer
               dA  = s·dyBᵀ·x                          [r, in]
               dB  = s·dyᵀ·xa                          [out, r]
               db  = Σ_N dy

Saved for backward: x and xa (rank r), plus the weights themselves (no copies) —
not the output. The frozen weight's gradient dW is never formed, and every
intermediate other than dx is rank r. An NF4 weight is dequantized into a
temporary in forward and again in backward (only when dx is needed); the dense
copy is never saved. Leading dimensions of x are flattened to N.

The big products are cuBLAS/oneDNN matmuls (``torch.mm``/``addmm``); the Triton
part is the NF4 dequantization (``kernels/nf4.py``). Forward and backward are
``torch.library.custom_op``s, so under ``torch.compile`` their buffers and what is
saved stay as written here.

Dispatch: CUDA tensors (or a forced Triton path on CPU) take the custom ops;
everything else takes ``lora_linear_reference``, plain autograd over ``F.linear``
(for NF4, torchao's own linear), which inductor fuses on CPU.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastune.kernels.dispatch import use_triton
from fastune.kernels.nf4 import dequantize_parts, is_nf4, nf4_parts
from fastune.kernels.autocast import no_autocast


class LoRAKernelError(ValueError):
    """Arguments that a LoRA op cannot take (one-line message)."""


# --- shared pieces (also used by kernels/lora_mlp.py) ---------------------------------

def weight_args(weight: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
    """A base weight as the plain (tensors, ints) that custom ops accept: an NF4 weight
    is its inner tensors and [block_size, scaler_block_size, out, in]; a dense weight
    is ([W], [0, 0, out, in]), block size 0 marking it dense."""
    return nf4_parts(weight) if is_nf4(weight) else ([weight], [0, 0, *weight.shape])


def materialize(parts: list[torch.Tensor], meta: list[int], dtype: torch.dtype) -> torch.Tensor:
    """The dense base weight for ``weight_args`` output: W itself, or a fresh dequantized
    temporary in ``dtype`` for NF4."""
    return dequantize_parts(parts, meta, dtype) if meta[0] else parts[0]


def lora_forward_2d(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                    lora_b: torch.Tensor, scale: float,
                    bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, xa) for 2-D x: y = x·Wᵀ + b + s·xa·Bᵀ in one output buffer, xa = x·Aᵀ."""
    xa = torch.mm(x, lora_a.t())
    y = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
    y.addmm_(xa, lora_b.t(), alpha=scale)
    return y, xa


def lora_backward_2d(dy: torch.Tensor, x: torch.Tensor, xa: torch.Tensor,
                     weight: Optional[torch.Tensor], lora_a: torch.Tensor, lora_b: torch.Tensor,
                     scale: float, need_da: bool, need_db: bool,
                     dx: Optional[torch.Tensor] = None) -> tuple[Optional[torch.Tensor], ...]:
    """(dx, dA, dB) for 2-D tensors, each None when not asked for. dx is computed when
    ``weight`` is given; it is accumulated into ``dx`` when that buffer is passed (so
    that several projections of the same input share one dx buffer)."""
    dyb = torch.mm(dy, lora_b)  # [N, r]
    if weight is not None:
        dx = torch.mm(dy, weight) if dx is None else dx.addmm_(dy, weight)
        dx.addmm_(dyb, lora_a, alpha=scale)
    d_a = scaled_mm(dyb.t(), x, scale) if need_da else None
    d_b = scaled_mm(dy.t(), xa, scale) if need_db else None
    return dx, d_a, d_b


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """scale·(a·b) rounded once: the scale is the GEMM's alpha, applied in its fp32
    accumulator (beta=0: the fresh buffer is not read). ``(a @ b) * scale`` would round
    twice, which in bf16 doubles the error of the small adapter gradients."""
    return a.new_empty(a.shape[0], b.shape[1]).addmm_(a, b, beta=0, alpha=scale)


def check_lora_args(in_features: int, dtype: torch.dtype, weight: torch.Tensor,
                    lora_a: torch.Tensor, lora_b: torch.Tensor,
                    bias: Optional[torch.Tensor] = None, name: str = "lora_linear") -> None:
    """One clear line for arguments the ops cannot take: shapes that do not fit an input
    of ``in_features`` in ``dtype``, mixed dtypes, or a base weight that requires grad."""
    out_dim, in_dim = weight.shape
    rank = lora_a.shape[0]
    if in_features != in_dim or lora_a.shape != (rank, in_dim) or lora_b.shape != (out_dim, rank):
        raise LoRAKernelError(
            f"{name}: shapes do not fit: input features {in_features}, weight {tuple(weight.shape)}, "
            f"lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)} "
            "(expected weight [out, in], lora_a [r, in], lora_b [out, r])"
        )
    dense = [] if is_nf4(weight) else [weight]
    for t in [lora_a, lora_b, *dense, *([] if bias is None else [bias])]:
        if t.dtype != dtype:
            raise LoRAKernelError(
                f"{name}: input is {dtype} but a weight is {t.dtype}; cast the adapter first")
    if bias is not None and bias.shape != (out_dim,):
        raise LoRAKernelError(f"{name}: bias shape {tuple(bias.shape)} != ({out_dim},)")
    if weight.requires_grad and torch.is_grad_enabled():
        raise LoRAKernelError(f"{name}: the base weight must be frozen (requires_grad=False)")


# --- op registration -------------------------------------------------------------------

@torch.library.custom_op("fastune::lora_linear", mutates_args=())
def _lora_linear_op(x: torch.Tensor, weight: list[torch.Tensor], weight_meta: list[int],
                    lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                    bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    w = materialize(weight, weight_meta, x.dtype)
    y, xa = lora_forward_2d(x.reshape(-1, x.shape[-1]), w, lora_a, lora_b, scale, bias)
    return y.view(*x.shape[:-1], y.shape[-1]), xa


@_lora_linear_op.register_fake
def _(x, weight, weight_meta, lora_a, lora_b, scale, bias):
    rows = x.numel() // x.shape[-1]
    y = x.new_empty(*x.shape[:-1], weight_meta[2])
    return y, x.new_empty(rows, lora_a.shape[0])


@torch.library.custom_op("fastune::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(
    dy: torch.Tensor, x: torch.Tensor, xa: torch.Tensor, weight: list[torch.Tensor],
    weight_meta: list[int], lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB, dbias); ``needs`` says which, and the others come back empty."""
    need_dx, need_da, need_db, need_dbias = needs
    dy2 = dy.reshape(-1, dy.shape[-1])
    w = materialize(weight, weight_meta, dy.dtype) if need_dx else None
    dx, d_a, d_b = lora_backward_2d(dy2, x.reshape(-1, x.shape[-1]), xa, w, lora_a, lora_b,
                                    scale, need_da, need_db)
    grads = (dx.view(x.shape) if need_dx else None, d_a, d_b, dy2.sum(0) if need_dbias else None)
    return tuple(dy.new_empty(0) if g is None else g for g in grads)  # outputs may not alias


@_lora_linear_backward_op.register_fake
def _(dy, x, xa, weight, weight_meta, lora_a, lora_b, scale, needs):
    shapes = (x.shape, lora_a.shape, lora_b.shape, (dy.shape[-1],))
    return tuple(dy.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


def _setup_context(ctx, inputs, output):
    x, weight, weight_meta, lora_a, lora_b, scale, bias = inputs
    ctx.save_for_backward(x, output[1], lora_a, lora_b, *weight)
    ctx.weight_meta, ctx.scale, ctx.n_weight = weight_meta, scale, len(weight)
    ctx.set_materialize_grads(False)  # xa is an output only so that it can be saved


@no_autocast
def _backward(ctx, dy, _dxa):
    x, xa, lora_a, lora_b, *weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    needs = [need[0], need[3], need[4], need[6]]
    grads = _lora_linear_backward_op(dy, x, xa, weight, ctx.weight_meta, lora_a, lora_b,
                                     ctx.scale, needs)
    dx, d_a, d_b, d_bias = (g if n else None for g, n in zip(grads, needs))
    # A list of ints gets a single None (torch.library's rule), a list of tensors one per tensor.
    return dx, [None] * ctx.n_weight, None, d_a, d_b, None, d_bias


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


# --- reference and public function -------------------------------------------------------

def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                          lora_b: torch.Tensor, scale: float,
                          bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain PyTorch: x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ with autograd. For an NF4 weight,
    ``F.linear`` is torchao's (dequantize in forward and backward, no dW)."""
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x, lora_a), lora_b)


@no_autocast
def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x·Wᵀ + b + scale·(x·Aᵀ)·Bᵀ with a frozen W [out, in] (dense or torchao
    NF4Tensor), A [r, in], B [out, r] and x [..., in]; gradients for x, A, B and a
    trainable bias. The custom ops on CUDA (or forced), the reference elsewhere."""
    check_lora_args(x.shape[-1], x.dtype, weight, lora_a, lora_b, bias)
    if use_triton(x):
        parts, meta = weight_args(weight)
        return _lora_linear_op(x, parts, meta, lora_a, lora_b, float(scale), bias)[0]
    return lora_linear_reference(x, weight, lora_a, lora_b, scale, bias)

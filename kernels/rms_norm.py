"""Fused RMSNorm, and residual add + RMSNorm, with the numerics of HF's LlamaRMSNorm
or, as constexpr variants of the same kernels, of Gemma's RMSNorm.

Forward, per row x of length N, in fp32:
    rstd = 1 / sqrt(mean(x^2) + eps)
    xhat = x * rstd
    y    = w * cast(xhat, x.dtype)          dtype of y: promote(w.dtype, x.dtype), as HF
With ``weight_offset`` o the scale is (o + w) instead of w (Gemma: o = 1, w stored as
zeros-centred); with ``weight_in_fp32`` the product is taken in fp32 and cast once
(Gemma2RMSNorm / Gemma3RMSNorm: ``(xhat * (1 + w.float())).type_as(x)``):
    y    = cast((o + w) * xhat, x.dtype)    dtype of y: x.dtype
``add_rms_norm(x, r, w)`` first forms s = x + r, rounded to the input dtype, and
returns (s, rms_norm(s)): the residual stream and the next sublayer's input in one
pass over memory.

Backward, with g = dL/dy and gx = g * (o + w) (fp32):
    dx = rstd * (gx - xhat * mean(gx * xhat))
    dw = sum over rows of g * xhat
The cast to x.dtype passes gradients through unchanged, as autograd does for ``.to``.
dw is accumulated in fp32: each program sums its block of rows into one fp32 partial
row, and the partial rows are summed once at the end. For add_rms_norm, the gradient
arriving at s is added to dx, and dL/dx = dL/dr = that total.

Saved for backward: the normalized input (x, or s for add_rms_norm, which is an
output anyway) and rstd in fp32, one value per row. xhat is recomputed.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastune.kernels.dispatch import use_triton
from fastune.kernels.interpreter import cast
from fastune.kernels.autocast import no_autocast

# Longest row the kernels take: the whole row sits in registers, and the backward
# spills beyond 8192 (ptxas, sm_80..sm_90). Longer rows (Llama 3.1 405B's 16384)
# take the reference path, which computes the same values.
MAX_COLS = 8192


@triton.jit
def _scale(W, cols, mask, OFFSET: tl.constexpr, WEIGHT_FP32: tl.constexpr):
    """(OFFSET + w) in fp32; rounded to w's dtype first unless WEIGHT_FP32, as
    ``weight + offset`` in PyTorch is."""
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if OFFSET != 0.0:
        w += OFFSET
        if not WEIGHT_FP32:
            w = cast(w, W.dtype.element_ty).to(tl.float32)
    return w


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, S, Y, W, RSTD,
    stride_x, stride_r, stride_s, stride_y,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
    OFFSET: tl.constexpr, WEIGHT_FP32: tl.constexpr,
):
    """One program per row: y = w * cast(x * rstd); with HAS_RESIDUAL, x := s = x + r.
    OFFSET, WEIGHT_FP32: Gemma's numerics (see the module docstring)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        # Round the sum to the input dtype, as `x + r` in PyTorch does.
        x = cast(x.to(tl.float32) + r.to(tl.float32), S.dtype.element_ty)
        tl.store(S + row * stride_s + cols, x, mask=mask)
    x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    xhat = x * rstd
    if not WEIGHT_FP32:
        xhat = cast(xhat, X.dtype.element_ty).to(tl.float32)
    w = _scale(W, cols, mask, OFFSET, WEIGHT_FP32)
    tl.store(Y + row * stride_y + cols, cast(w * xhat, Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DS, DX, DW_PARTIAL,
    stride_dy, stride_x, stride_ds, stride_dx,
    n_rows, n_cols, rows_per_program,
    HAS_DSUM: tl.constexpr, NEED_DW: tl.constexpr, BLOCK: tl.constexpr,
    OFFSET: tl.constexpr, WEIGHT_FP32: tl.constexpr,
):
    """Each program walks a contiguous block of rows, writing dx per row and keeping
    its share of dw as one fp32 row, stored to DW_PARTIAL[program]."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = _scale(W, cols, mask, OFFSET, WEIGHT_FP32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        gx = dy * w
        dx = rstd * (gx - xhat * (tl.sum(gx * xhat, axis=0) / n_cols))
        if HAS_DSUM:
            dx += tl.load(DS + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, cast(dx, DX.dtype.element_ty), mask=mask)
        if NEED_DW:
            dw += dy * xhat
    if NEED_DW:
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


def launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of ``n_cols`` <= MAX_COLS: the whole row in one
    block, about 8 values per thread (2048 -> 8 warps, 4096 -> 16, 8192 -> 32)."""
    block = triton.next_power_of_2(n_cols)
    return block, min(max(block // 256, 1), 32)


def _num_bwd_programs(x: torch.Tensor, n_rows: int) -> int:
    """A few programs per SM on CUDA, so dw needs only a short final sum."""
    if x.is_cuda:
        return min(n_rows, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count)
    return min(n_rows, 8)  # the interpreter runs programs one after another


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[rows, N] view with unit column stride (a copy only if the input needs one)."""
    return t.reshape(-1, t.shape[-1]) if t.stride(-1) == 1 else t.contiguous().view(-1, t.shape[-1])


def _out_dtype(x: torch.Tensor, weight: torch.Tensor, weight_in_fp32: bool) -> torch.dtype:
    return x.dtype if weight_in_fp32 else torch.promote_types(weight.dtype, x.dtype)


def _fwd(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float,
         weight_offset: float, weight_in_fp32: bool):
    """Launch the forward kernel; returns (y, s or None, rstd)."""
    x2 = _rows(x)
    n_rows, n_cols = x2.shape
    block, num_warps = launch_config(n_cols)
    y = torch.empty(x.shape, dtype=_out_dtype(x, weight, weight_in_fp32), device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    y2 = y.view(-1, n_cols)
    if residual is None:
        r2 = s2 = s = None
    else:
        r2 = _rows(residual)
        s = torch.empty_like(x, memory_format=torch.contiguous_format)
        s2 = s.view(-1, n_cols)
    _rms_norm_fwd_kernel[(n_rows,)](
        x2, r2, s2, y2, weight.contiguous(), rstd,
        x2.stride(0), 0 if r2 is None else r2.stride(0), 0 if s2 is None else s2.stride(0),
        y2.stride(0), n_cols, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block,
        OFFSET=float(weight_offset), WEIGHT_FP32=weight_in_fp32, num_warps=num_warps,
    )
    return y, s, rstd


@torch.library.custom_op("fastune::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float,
                 weight_in_fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    y, _, rstd = _fwd(x, None, weight, eps, weight_offset, weight_in_fp32)
    return y, rstd


@torch.library.custom_op("fastune::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float, weight_offset: float,
                     weight_in_fp32: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, s, rstd = _fwd(x, residual, weight, eps, weight_offset, weight_in_fp32)
    return s, y, rstd


@torch.library.custom_op("fastune::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                          dsum: Optional[torch.Tensor], need_dweight: bool, weight_offset: float,
                          weight_in_fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight); dweight is an empty tensor when ``need_dweight`` is False
    (a frozen norm weight, as in LoRA), which skips its partial sums entirely."""
    x2, dy2 = _rows(x), _rows(dy)
    ds2 = None if dsum is None else _rows(dsum)
    n_rows, n_cols = x2.shape
    block, num_warps = launch_config(n_cols)
    programs = max(_num_bwd_programs(x, n_rows), 1)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dx2 = dx.view(-1, n_cols)
    partial = torch.empty((programs, n_cols) if need_dweight else (0,), dtype=torch.float32, device=x.device)
    _rms_norm_bwd_kernel[(programs,)](
        dy2, x2, weight.contiguous(), rstd, ds2, dx2, partial,
        dy2.stride(0), x2.stride(0), 0 if ds2 is None else ds2.stride(0), dx2.stride(0),
        n_rows, n_cols, triton.cdiv(n_rows, programs),
        HAS_DSUM=dsum is not None, NEED_DW=need_dweight, BLOCK=block,
        OFFSET=float(weight_offset), WEIGHT_FP32=weight_in_fp32, num_warps=num_warps,
    )
    dweight = partial.sum(0).to(weight.dtype) if need_dweight else weight.new_empty(0)
    return dx, dweight


@_rms_norm_op.register_fake
def _(x, weight, eps, weight_offset, weight_in_fp32):
    y = x.new_empty(x.shape, dtype=_out_dtype(x, weight, weight_in_fp32))
    return y, x.new_empty(x.shape[:-1], dtype=torch.float32)


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps, weight_offset, weight_in_fp32):
    y = x.new_empty(x.shape, dtype=_out_dtype(x, weight, weight_in_fp32))
    return x.new_empty(x.shape), y, x.new_empty(x.shape[:-1], dtype=torch.float32)


@_rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd, dsum, need_dweight, weight_offset, weight_in_fp32):
    return x.new_empty(x.shape), weight.new_empty(weight.shape if need_dweight else (0,))


def _setup_rms_norm(ctx, inputs, output):
    x, weight, _, ctx.weight_offset, ctx.weight_in_fp32 = inputs
    ctx.save_for_backward(x, weight, output[1])


@no_autocast
def _backward_rms_norm(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    need_dw = ctx.needs_input_grad[1]
    dx, dw = torch.ops.fastune.rms_norm_backward(dy, x, weight, rstd, None, need_dw,
                                                 ctx.weight_offset, ctx.weight_in_fp32)
    return dx, (dw if need_dw else None), None, None, None


def _setup_add_rms_norm(ctx, inputs, output):
    _, _, weight, _, ctx.weight_offset, ctx.weight_in_fp32 = inputs
    s, _, rstd = output
    ctx.save_for_backward(s, weight, rstd)


@no_autocast
def _backward_add_rms_norm(ctx, ds, dy, _drstd):
    s, weight, rstd = ctx.saved_tensors
    need_dw = ctx.needs_input_grad[2]
    dx, dw = torch.ops.fastune.rms_norm_backward(dy, s, weight, rstd, ds, need_dw,
                                                 ctx.weight_offset, ctx.weight_in_fp32)
    return dx, dx, (dw if need_dw else None), None, None, None


_rms_norm_op.register_autograd(_backward_rms_norm, setup_context=_setup_rms_norm)
_add_rms_norm_op.register_autograd(_backward_add_rms_norm, setup_context=_setup_add_rms_norm)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                       weight_offset: float = 0.0, weight_in_fp32: bool = False) -> torch.Tensor:
    """HF LlamaRMSNorm in plain PyTorch (inductor fuses it on CPU). The defaults are the
    numerics the kernels compute; ``weight_offset=1, weight_in_fp32=True`` is Gemma's
    ``(1 + w) * xhat`` taken in fp32 and then cast."""
    x32 = x.float()
    xhat = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if weight_in_fp32:
        return ((weight_offset + weight.float()) * xhat).to(x.dtype)
    scale = weight + weight_offset if weight_offset else weight
    return scale * xhat.to(x.dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float = 1e-6, weight_offset: float = 0.0,
                           weight_in_fp32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    s = x + residual
    return s, rms_norm_reference(s, weight, eps, weight_offset, weight_in_fp32)


def _check(name: str, x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor] = None):
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"{name}: weight shape {tuple(weight.shape)} does not match the last "
                         f"dim of x {tuple(x.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"{name}: residual {tuple(residual.shape)} {residual.dtype} must match "
                         f"x {tuple(x.shape)} {x.dtype}")


@no_autocast
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
             weight_offset: float = 0.0, weight_in_fp32: bool = False) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` ([..., N]) with ``weight`` [N], as HF Llama;
    ``weight_offset=1.0, weight_in_fp32=True`` is Gemma's (see the module docstring)."""
    _check("rms_norm", x, weight)
    if use_triton(x) and x.shape[-1] <= MAX_COLS:
        return torch.ops.fastune.rms_norm(x, weight, eps, float(weight_offset), weight_in_fp32)[0]
    return rms_norm_reference(x, weight, eps, weight_offset, weight_in_fp32)


@no_autocast
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float = 1e-6, weight_offset: float = 0.0,
                 weight_in_fp32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, rms_norm(s)) with s = x + residual: the fused residual add of a decoder layer."""
    _check("add_rms_norm", x, weight, residual)
    if use_triton(x) and x.shape[-1] <= MAX_COLS:
        s, y, _ = torch.ops.fastune.add_rms_norm(x, residual, weight, eps, float(weight_offset),
                                                 weight_in_fp32)
        return s, y
    return add_rms_norm_reference(x, residual, weight, eps, weight_offset, weight_in_fp32)


def aot_specs() -> list[dict]:
    """Launches for kernels/aot.py: Llama hidden sizes 2048 (8 warps), 4096 (16) and
    8192 (32, the largest), every kernel variant at 4096 and 8192; Gemma's numerics
    (offset 1, product in fp32) at Gemma 2 2B's 2304 and Gemma 3 1B's 1152."""
    variants = [(4096, "bf16", v, False) for v in ("fwd", "fwd+add", "bwd", "bwd+dsum")]
    variants += [(8192, "bf16", v, False) for v in ("fwd", "fwd+add", "bwd", "bwd+dsum")]
    variants += [(2048, "bf16", "fwd", False), (2048, "bf16", "bwd", False),
                 (4096, "fp32", "fwd+add", False), (4096, "fp32", "bwd+dsum", False)]
    variants += [(2304, "bf16", v, True) for v in ("fwd", "fwd+add", "bwd", "bwd+dsum")]
    variants += [(1152, "bf16", "fwd+add", True), (1152, "bf16", "bwd+dsum", True)]
    specs = []
    for n_cols, dt, variant, gemma in variants:
        block, num_warps = launch_config(n_cols)
        if variant.startswith("fwd"):
            kernel, flags = _rms_norm_fwd_kernel, {"HAS_RESIDUAL": variant == "fwd+add"}
            ptrs = {"X": dt, "R": dt, "S": dt, "Y": dt, "W": dt, "RSTD": "fp32"}
            ints = {"stride_x": "i32", "stride_r": "i32", "stride_s": "i32", "stride_y": "i32",
                    "n_cols": "i32", "eps": "fp32"}
        else:
            kernel, flags = _rms_norm_bwd_kernel, {"HAS_DSUM": variant == "bwd+dsum", "NEED_DW": True}
            ptrs = {"DY": dt, "X": dt, "W": dt, "RSTD": "fp32", "DS": dt, "DX": dt, "DW_PARTIAL": "fp32"}
            ints = {"stride_dy": "i32", "stride_x": "i32", "stride_ds": "i32", "stride_dx": "i32",
                    "n_rows": "i32", "n_cols": "i32", "rows_per_program": "i32"}
        constexprs = {**flags, "BLOCK": block, "OFFSET": 1.0 if gemma else 0.0, "WEIGHT_FP32": gemma}
        signature = {**{k: "*" + v for k, v in ptrs.items()}, **ints, **{k: "constexpr" for k in constexprs}}
        specs.append(dict(
            name=f"rms_norm_{variant}{' gemma' if gemma else ''} h={n_cols} {dt}", kernel=kernel,
            signature=signature,
            constexprs=constexprs, num_warps=num_warps,
            multiple_of_16=[k for k in ints if k.startswith("stride") or k == "n_cols"],
        ))
    return specs

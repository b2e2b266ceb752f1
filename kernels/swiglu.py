"""SwiGLU gate: out = silu(gate) * up, elementwise.

Forward, in fp32 and rounded once to the inputs' dtype, with sig = sigmoid(g):
    out = g * sig * u
Backward, with dout the incoming gradient:
    dgate = dout * u * sig * (1 + g * (1 - sig))      (d silu(g)/dg = sig + g*sig*(1-sig))
    dup   = dout * g * sig
Saved for backward: gate and up only; sigmoid and silu are recomputed, so the
[tokens, intermediate] silu activation is never stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastune.kernels.dispatch import use_triton
from fastune.kernels.interpreter import cast
from fastune.kernels.autocast import no_autocast

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _swiglu_fwd_kernel(G, U, OUT, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, cast(g * tl.sigmoid(g) * u, OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DOUT, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(DG + offs, cast(dout * u * (sig + silu * (1.0 - sig)), DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, cast(dout * silu, DU.dtype.element_ty), mask=mask)


def swiglu_fwd_into(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel on contiguous tensors of one shape; returns ``out``."""
    _swiglu_fwd_kernel[(triton.cdiv(gate.numel(), BLOCK),)](
        gate, up, out, gate.numel(), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def swiglu_bwd_into(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                    dgate: torch.Tensor, dup: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel on contiguous tensors of one shape. Every element is
    read before it is written, so ``dgate`` or ``dup`` may be ``dout`` (or any other
    input no longer needed) to save memory."""
    _swiglu_bwd_kernel[(triton.cdiv(gate.numel(), BLOCK),)](
        dout, gate, up, dgate, dup, gate.numel(), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return dgate, dup


@torch.library.custom_op("fastune::swiglu", mutates_args=())
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    return swiglu_fwd_into(gate, up, torch.empty_like(gate))


@torch.library.custom_op("fastune::swiglu_backward", mutates_args=())
def _swiglu_backward_op(dout: torch.Tensor, gate: torch.Tensor,
                        up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dout, gate, up = dout.contiguous(), gate.contiguous(), up.contiguous()
    return swiglu_bwd_into(dout, gate, up, torch.empty_like(gate), torch.empty_like(up))


@_swiglu_op.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@_swiglu_backward_op.register_fake
def _(dout, gate, up):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(up, memory_format=torch.contiguous_format))


def _setup_swiglu(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


@no_autocast
def _backward_swiglu(ctx, dout):
    gate, up = ctx.saved_tensors
    return torch.ops.fastune.swiglu_backward(dout, gate, up)


_swiglu_op.register_autograd(_backward_swiglu, setup_context=_setup_swiglu)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The Llama MLP's ``silu(gate_proj(x)) * up_proj(x)`` (inductor fuses it on CPU)."""
    return F.silu(gate) * up


@no_autocast
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for tensors of one shape and dtype."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up "
                         f"{tuple(up.shape)} {up.dtype} must have one shape and dtype")
    if use_triton(gate):
        return torch.ops.fastune.swiglu(gate, up)
    return swiglu_reference(gate, up)


def aot_specs() -> list[dict]:
    """Launches for kernels/aot.py: the block size is fixed; bf16 and fp32."""
    specs = []
    for dt in ("bf16", "fp32"):
        specs.append(dict(
            name=f"swiglu_fwd {dt}", kernel=_swiglu_fwd_kernel, num_warps=NUM_WARPS,
            signature={"G": f"*{dt}", "U": f"*{dt}", "OUT": f"*{dt}", "n": "i32", "BLOCK": "constexpr"},
            constexprs={"BLOCK": BLOCK}, multiple_of_16=["n"]))
        specs.append(dict(
            name=f"swiglu_bwd {dt}", kernel=_swiglu_bwd_kernel, num_warps=NUM_WARPS,
            signature={"DOUT": f"*{dt}", "G": f"*{dt}", "U": f"*{dt}", "DG": f"*{dt}", "DU": f"*{dt}",
                       "n": "i32", "BLOCK": "constexpr"},
            constexprs={"BLOCK": BLOCK}, multiple_of_16=["n"]))
    return specs

"""GeGLU gate with the tanh-approximated GELU (Gemma): out = gelu_tanh(gate) * up.

Forward, in fp32 and rounded once to the inputs' dtype, with
y = K * (g + C * g^3), K = sqrt(2 / pi), C = 0.044715, t = tanh(y):
    gelu = 0.5 * g * (1 + t) = g * s,   s = sigmoid(2y)
    out  = gelu * u
Backward, with dout the incoming gradient:
    dgelu/dg = 0.5 * (1 + t) + 0.5 * g * (1 - t^2) * K * (1 + 3 * C * g^2)
             = s + 2 * g * s * sigmoid(-2y) * K * (1 + 3 * C * g^2)
    dgate    = dout * u * dgelu/dg
    dup      = dout * gelu
The sigmoid forms avoid the cancellation of 1 + t and 1 - t^2 in the tails (where
torch's fp32 GELU backward flushes to 0). Saved for backward: gate and up only; the
activation is recomputed, so the [tokens, intermediate] activation is never stored.
The contract is swiglu's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastune.kernels.autocast import no_autocast
from fastune.kernels.dispatch import use_triton
from fastune.kernels.interpreter import cast

BLOCK = 1024
NUM_WARPS = 4
# constexpr: a jit function may read only constexpr globals.
K = tl.constexpr(math.sqrt(2.0 / math.pi))
C = tl.constexpr(0.044715)


@triton.jit
def _gelu_tanh_parts(g):
    """(y, s, gelu) of g in fp32 (see the module docstring)."""
    # Clamped so that exp stays finite (numpy warns of overflow under the interpreter);
    # beyond |y| = 40 every term it feeds is 1 or below 1e-33 in magnitude.
    y = tl.minimum(tl.maximum(K * (g + C * g * g * g), -40.0), 40.0)
    s = tl.sigmoid(2.0 * y)
    return y, s, g * s


@triton.jit
def _geglu_fwd_kernel(G, U, OUT, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    _, _, gelu = _gelu_tanh_parts(g)
    tl.store(OUT + offs, cast(gelu * u, OUT.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd_kernel(DOUT, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    y, s, gelu = _gelu_tanh_parts(g)
    dgelu = s + 2.0 * g * s * tl.sigmoid(-2.0 * y) * K * (1.0 + 3.0 * C * g * g)
    tl.store(DG + offs, cast(dout * u * dgelu, DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, cast(dout * gelu, DU.dtype.element_ty), mask=mask)


def geglu_fwd_into(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel on contiguous tensors of one shape; returns ``out``."""
    _geglu_fwd_kernel[(triton.cdiv(gate.numel(), BLOCK),)](
        gate, up, out, gate.numel(), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def geglu_bwd_into(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                   dgate: torch.Tensor, dup: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel on contiguous tensors of one shape. Every element is
    read before it is written, so ``dgate`` or ``dup`` may be ``dout`` (or any other
    input no longer needed) to save memory."""
    _geglu_bwd_kernel[(triton.cdiv(gate.numel(), BLOCK),)](
        dout, gate, up, dgate, dup, gate.numel(), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return dgate, dup


@torch.library.custom_op("fastune::geglu", mutates_args=())
def _geglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    return geglu_fwd_into(gate, up, torch.empty_like(gate))


@torch.library.custom_op("fastune::geglu_backward", mutates_args=())
def _geglu_backward_op(dout: torch.Tensor, gate: torch.Tensor,
                       up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dout, gate, up = dout.contiguous(), gate.contiguous(), up.contiguous()
    return geglu_bwd_into(dout, gate, up, torch.empty_like(gate), torch.empty_like(up))


@_geglu_op.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@_geglu_backward_op.register_fake
def _(dout, gate, up):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(up, memory_format=torch.contiguous_format))


def _setup_geglu(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


@no_autocast
def _backward_geglu(ctx, dout):
    gate, up = ctx.saved_tensors
    return torch.ops.fastune.geglu_backward(dout, gate, up)


_geglu_op.register_autograd(_backward_geglu, setup_context=_setup_geglu)


def geglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The Gemma MLP's ``gelu_pytorch_tanh(gate_proj(x)) * up_proj(x)``, as transformers
    computes it (inductor fuses it on CPU)."""
    return F.gelu(gate, approximate="tanh") * up


@no_autocast
def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up for tensors of one shape and dtype."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"geglu: gate {tuple(gate.shape)} {gate.dtype} and up "
                         f"{tuple(up.shape)} {up.dtype} must have one shape and dtype")
    if use_triton(gate):
        return torch.ops.fastune.geglu(gate, up)
    return geglu_reference(gate, up)


def aot_specs() -> list[dict]:
    """Launches for kernels/aot.py: the block size is fixed; bf16 and fp32."""
    specs = []
    for dt in ("bf16", "fp32"):
        specs.append(dict(
            name=f"geglu_fwd {dt}", kernel=_geglu_fwd_kernel, num_warps=NUM_WARPS,
            signature={"G": f"*{dt}", "U": f"*{dt}", "OUT": f"*{dt}", "n": "i32", "BLOCK": "constexpr"},
            constexprs={"BLOCK": BLOCK}, multiple_of_16=["n"]))
        specs.append(dict(
            name=f"geglu_bwd {dt}", kernel=_geglu_bwd_kernel, num_warps=NUM_WARPS,
            signature={"DOUT": f"*{dt}", "G": f"*{dt}", "U": f"*{dt}", "DG": f"*{dt}", "DU": f"*{dt}",
                       "n": "i32", "BLOCK": "constexpr"},
            constexprs={"BLOCK": BLOCK}, multiple_of_16=["n"]))
    return specs

"""Fused LoRA MLP block (Llama SwiGLU MLP with a LoRA adapter on each projection).

With x [N, H], frozen gate/up weights Wg, Wu [I, H] and down weight Wd [H, I]
(dense or torchao NF4Tensor), adapters A* [r, in], B* [out, r], one scale s, and
lora(x; W, A, B) = x·Wᵀ + s·(x·Aᵀ)·Bᵀ (see kernels/lora.py):

    forward    g = lora(x; Wg, Ag, Bg)          [N, I]   pre-activations, saved
               u = lora(x; Wu, Au, Bu)          [N, I]   saved
               h = silu(g) · u                  [N, I]   Triton, not saved
               y = lora(h; Wd, Ad, Bd)          [N, H]

    backward   h = silu(g) · u                  recomputed (Triton)
               dyB = dy·Bd,  hA = h·Adᵀ          rank r, recomputed
               dAd = s·dyBᵀ·h,  dBd = s·dyᵀ·hA
               dh = dy·Wd + s·dyB·Ad
               dg = dh · u · σ(g)(1 + g(1 - σ(g)))     Triton, written over dh
               du = dh · silu(g)                       Triton, written over h
               then for (dg; Wg, Ag, Bg) and (du; Wu, Au, Bu), with xA = x·Aᵀ
               recomputed: dA = s·(d·B)ᵀ·x, dB = s·dᵀ·xA, and
               dx = dg·Wg + du·Wu + s·(dg·Bg)·Ag + s·(du·Bu)·Au in one buffer.

Saved for backward: x, g and u (plus the weights themselves, not copies). silu·u
and all rank-r intermediates are recomputed; NF4 weights are dequantized again.
Peak extra memory in backward is two [N, I] buffers (h, dh), reused for du, dg.

The matmuls are cuBLAS/oneDNN (``torch.mm``); the elementwise SwiGLU forward and
backward are the Triton kernels of kernels/swiglu.py (fp32 inside, one rounding per
output), launched on the buffers above; NF4 weights use kernels/nf4.py. Forward and
backward are ``torch.library.custom_op``s, so under ``torch.compile`` the buffers
and what is saved stay as written here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastune.kernels.dispatch import use_triton
from fastune.kernels.lora import (
    LoRAKernelError,
    check_lora_args,
    lora_backward_2d,
    lora_forward_2d,
    lora_linear_reference,
    materialize,
    weight_args,
)
from fastune.kernels.swiglu import swiglu_bwd_into, swiglu_fwd_into
from fastune.kernels.autocast import no_autocast

# --- op registration -------------------------------------------------------------------

@torch.library.custom_op("fastune::lora_mlp", mutates_args=())
def _lora_mlp_op(
    x: torch.Tensor,
    gate_w: list[torch.Tensor], gate_meta: list[int], gate_a: torch.Tensor, gate_b: torch.Tensor,
    up_w: list[torch.Tensor], up_meta: list[int], up_a: torch.Tensor, up_b: torch.Tensor,
    down_w: list[torch.Tensor], down_meta: list[int], down_a: torch.Tensor, down_b: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, g, u); g and u are outputs only so that they can be saved for backward."""
    x2 = x.reshape(-1, x.shape[-1])
    g, _ = lora_forward_2d(x2, materialize(gate_w, gate_meta, x.dtype), gate_a, gate_b, scale)
    u, _ = lora_forward_2d(x2, materialize(up_w, up_meta, x.dtype), up_a, up_b, scale)
    h = swiglu_fwd_into(g, u, torch.empty_like(g))
    y, _ = lora_forward_2d(h, materialize(down_w, down_meta, x.dtype), down_a, down_b, scale)
    return y.view(x.shape[:-1] + (y.shape[-1],)), g, u


@_lora_mlp_op.register_fake
def _(x, gate_w, gate_meta, gate_a, gate_b, up_w, up_meta, up_a, up_b,
      down_w, down_meta, down_a, down_b, scale):
    rows, inter = x.numel() // x.shape[-1], gate_meta[2]
    return (x.new_empty(x.shape[:-1] + (down_meta[2],)),
            x.new_empty(rows, inter), x.new_empty(rows, inter))


@torch.library.custom_op("fastune::lora_mlp_backward", mutates_args=())
def _lora_mlp_backward_op(
    dy: torch.Tensor, x: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
    gate_w: list[torch.Tensor], gate_meta: list[int], gate_a: torch.Tensor, gate_b: torch.Tensor,
    up_w: list[torch.Tensor], up_meta: list[int], up_a: torch.Tensor, up_b: torch.Tensor,
    down_w: list[torch.Tensor], down_meta: list[int], down_a: torch.Tensor, down_b: torch.Tensor,
    scale: float, needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """(dx, dAg, dBg, dAu, dBu, dAd, dBd); ``needs`` says which, the others come back empty."""
    need_dx, *need_ab = needs
    dtype = x.dtype
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])

    h = swiglu_fwd_into(g, u, torch.empty_like(g))
    h_a = torch.mm(h, down_a.t())
    dh, d_down_a, d_down_b = lora_backward_2d(
        dy2, h, h_a, materialize(down_w, down_meta, dtype), down_a, down_b, scale,
        need_ab[4], need_ab[5])
    del h_a
    dg, du = swiglu_bwd_into(dh, g, u, dgate=dh, dup=h)  # h is dead once dAd is formed

    def project(d, w, meta, a, b, need_a, need_b, dx):
        weight = materialize(w, meta, dtype) if need_dx else None
        return lora_backward_2d(d, x2, torch.mm(x2, a.t()), weight, a, b, scale, need_a, need_b, dx=dx)

    dx, d_gate_a, d_gate_b = project(dg, gate_w, gate_meta, gate_a, gate_b, need_ab[0], need_ab[1], None)
    dx, d_up_a, d_up_b = project(du, up_w, up_meta, up_a, up_b, need_ab[2], need_ab[3], dx)

    grads = (dx.view(x.shape) if need_dx else None,
             d_gate_a, d_gate_b, d_up_a, d_up_b, d_down_a, d_down_b)
    return tuple(dy.new_empty(0) if t is None else t for t in grads)  # outputs may not alias


@_lora_mlp_backward_op.register_fake
def _(dy, x, g, u, gate_w, gate_meta, gate_a, gate_b, up_w, up_meta, up_a, up_b,
      down_w, down_meta, down_a, down_b, scale, needs):
    shapes = (x.shape, gate_a.shape, gate_b.shape, up_a.shape, up_b.shape,
              down_a.shape, down_b.shape)
    return tuple(dy.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


# Positions of the differentiable inputs of fastune::lora_mlp: x, then A and B of
# gate, up and down (the weight lists and their metadata sit in between).
_GRAD_INPUTS = (0, 3, 4, 7, 8, 11, 12)


def _setup_context(ctx, inputs, output):
    x, gate_w, gate_meta, gate_a, gate_b, up_w, up_meta, up_a, up_b, \
        down_w, down_meta, down_a, down_b, scale = inputs
    _, g, u = output
    ctx.save_for_backward(x, g, u, gate_a, gate_b, up_a, up_b, down_a, down_b,
                          *gate_w, *up_w, *down_w)
    ctx.metas = (gate_meta, up_meta, down_meta)
    ctx.n_weights = (len(gate_w), len(up_w), len(down_w))
    ctx.scale = scale
    ctx.set_materialize_grads(False)


@no_autocast
def _backward(ctx, dy, _dg, _du):
    x, g, u, gate_a, gate_b, up_a, up_b, down_a, down_b, *flat_w = ctx.saved_tensors
    n_gate, n_up, _ = ctx.n_weights
    gate_w, up_w, down_w = flat_w[:n_gate], flat_w[n_gate:n_gate + n_up], flat_w[n_gate + n_up:]
    gate_meta, up_meta, down_meta = ctx.metas
    needs = [ctx.needs_input_grad[i] for i in _GRAD_INPUTS]
    grads = _lora_mlp_backward_op(dy, x, g, u, gate_w, gate_meta, gate_a, gate_b,
                                  up_w, up_meta, up_a, up_b, down_w, down_meta, down_a, down_b,
                                  ctx.scale, needs)
    dx, dga, dgb, dua, dub, dda, ddb = (t if n else None for t, n in zip(grads, needs))
    # A list of ints gets a single None (torch.library's rule), a list of tensors one per tensor.
    return (dx, [None] * n_gate, None, dga, dgb, [None] * n_up, None, dua, dub,
            [None] * len(down_w), None, dda, ddb, None)


_lora_mlp_op.register_autograd(_backward, setup_context=_setup_context)


# --- reference and public function -------------------------------------------------------

def lora_mlp_reference(x, gate_w, gate_a, gate_b, up_w, up_a, up_b, down_w, down_a, down_b,
                       scale: float) -> torch.Tensor:
    """Plain PyTorch with autograd: down(silu(gate(x)) * up(x)), each a LoRA linear."""
    g = lora_linear_reference(x, gate_w, gate_a, gate_b, scale)
    u = lora_linear_reference(x, up_w, up_a, up_b, scale)
    return lora_linear_reference(F.silu(g) * u, down_w, down_a, down_b, scale)


@no_autocast
def lora_mlp(x: torch.Tensor, gate_w: torch.Tensor, gate_a: torch.Tensor, gate_b: torch.Tensor,
             up_w: torch.Tensor, up_a: torch.Tensor, up_b: torch.Tensor,
             down_w: torch.Tensor, down_a: torch.Tensor, down_b: torch.Tensor,
             scale: float) -> torch.Tensor:
    """Llama MLP with LoRA on gate, up and down: down(silu(gate(x)) * up(x)).
    x [..., H]; frozen gate_w/up_w [I, H], down_w [H, I], dense or torchao NF4Tensor;
    adapters *_a [r, in], *_b [out, r]; one ``scale`` for all three. Gradients for x
    and every A and B. The custom ops on CUDA (or forced), the reference elsewhere."""
    hidden, inter = x.shape[-1], gate_w.shape[0]
    check_lora_args(hidden, x.dtype, gate_w, gate_a, gate_b, name="lora_mlp gate")
    check_lora_args(hidden, x.dtype, up_w, up_a, up_b, name="lora_mlp up")
    check_lora_args(inter, x.dtype, down_w, down_a, down_b, name="lora_mlp down")
    if up_w.shape != gate_w.shape:
        raise LoRAKernelError(f"lora_mlp: up weight {tuple(up_w.shape)} != gate weight {tuple(gate_w.shape)}")
    if not use_triton(x):
        return lora_mlp_reference(x, gate_w, gate_a, gate_b, up_w, up_a, up_b,
                                  down_w, down_a, down_b, scale)
    gate, up, down = weight_args(gate_w), weight_args(up_w), weight_args(down_w)
    return _lora_mlp_op(x, *gate, gate_a, gate_b, *up, up_a, up_b, *down, down_a, down_b,
                        float(scale))[0]

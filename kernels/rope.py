"""Rotary position embedding (HF half-split layout) for q and k in one launch.

Per token and head, with x split into halves (x1, x2) of D/2 and cos/sin [D] split
the same way (c1, c2), (s1, s2), the reference ``x * cos + rotate_half(x) * sin`` is
    out1 = x1 * c1 - x2 * s1
    out2 = x2 * c2 + x1 * s2
computed in fp32 and rounded once to promote(x.dtype, cos.dtype). cos/sin are
[B, S, D] or [1, S, D], so every token has its own position (packed sequences work).
In the HF layout c1 = c2 and s1 = s2 (the D/2 angles twice), but nothing here
assumes it.

Backward is the transpose of that linear map, which for c1 = c2, s1 = s2 is the
rotation by -theta:
    dx1 = g1 * c1 + g2 * s2
    dx2 = g2 * c2 - g1 * s1
so one kernel serves both directions, with the sine terms (s1, s2) replaced by
(-s2, -s1) in backward.

Partial rotary (cos/sin of R < D dims, Phi-4-mini): the halves are those of the
first R dims, and the last D - R dims are copied, forward and backward (the map is
the identity there).

Saved for backward: cos and sin only. They get no gradient (they come from a
buffer); pass tensors that do not require grad.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastune.kernels.dispatch import use_triton
from fastune.kernels.interpreter import cast
from fastune.kernels.autocast import no_autocast


@triton.jit
def _rotate_heads(X, OUT, stride_xh, stride_oh, n_heads, c1, c2, a, b, d, d_mask,
                  HALF: tl.constexpr, PASS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    """out1 = x1*c1 - x2*a, out2 = x2*c2 + x1*b for all heads of one token,
    BLOCK_H heads at a time; the PASS dims after the rotated 2*HALF are copied
    (partial rotary). X and OUT point at the token's first head."""
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h < n_heads)[:, None] & d_mask[None, :]
        x_ptrs = X + h[:, None] * stride_xh + d[None, :]
        o_ptrs = OUT + h[:, None] * stride_oh + d[None, :]
        x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(o_ptrs, cast(x1 * c1 - x2 * a, OUT.dtype.element_ty), mask=mask)
        tl.store(o_ptrs + HALF, cast(x2 * c2 + x1 * b, OUT.dtype.element_ty), mask=mask)
        if PASS > 0:
            p = tl.arange(0, BLOCK_P)
            p_mask = (h < n_heads)[:, None] & (p < PASS)[None, :]
            x_pass = tl.load(X + h[:, None] * stride_xh + 2 * HALF + p[None, :], mask=p_mask, other=0.0)
            tl.store(OUT + h[:, None] * stride_oh + 2 * HALF + p[None, :],
                     cast(x_pass.to(tl.float32), OUT.dtype.element_ty), mask=p_mask)


@triton.jit
def _rope_kernel(
    Q, K, COS, SIN, QO, KO,
    seq_len, n_q_heads, n_k_heads,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_qob, stride_qos, stride_qoh, stride_kob, stride_kos, stride_koh,
    stride_cb, stride_cs,
    HALF: tl.constexpr, PASS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr, BACKWARD: tl.constexpr,
):
    """One program per token (b, s): loads its cos/sin once, rotates all q and k heads."""
    token = tl.program_id(0)
    bi = (token // seq_len).to(tl.int64)
    si = (token % seq_len).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HALF
    cs_off = bi * stride_cb + si * stride_cs
    c1 = tl.load(COS + cs_off + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(COS + cs_off + HALF + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(SIN + cs_off + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(SIN + cs_off + HALF + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    if BACKWARD:
        a, b = -s2, -s1
    else:
        a, b = s1, s2
    _rotate_heads(Q + bi * stride_qb + si * stride_qs, QO + bi * stride_qob + si * stride_qos,
                  stride_qh, stride_qoh, n_q_heads, c1, c2, a, b, d, d_mask, HALF, PASS, BLOCK_H, BLOCK_P)
    _rotate_heads(K + bi * stride_kb + si * stride_ks, KO + bi * stride_kob + si * stride_kos,
                  stride_kh, stride_koh, n_k_heads, c1, c2, a, b, d, d_mask, HALF, PASS, BLOCK_H, BLOCK_P)


def launch_config(rotary_dim: int, n_heads: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_H, num_warps): half the rotated dims of a head per row of the
    tile, up to 2048 elements per tile (32 heads x 64 for head_dim 128)."""
    block_d = triton.next_power_of_2(rotary_dim // 2)
    block_h = min(triton.next_power_of_2(n_heads), max(2048 // block_d, 1))
    return block_d, block_h, 4


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
          out_dtype: torch.dtype, backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel on any [B, S, H, D] q/k strides with unit last stride; the
    outputs are new contiguous tensors of ``out_dtype``."""
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    cos, sin = _last_dim_contiguous(cos), _last_dim_contiguous(sin)
    if cos.stride() != sin.stride():  # the kernel reads both at one offset
        cos, sin = cos.contiguous(), sin.contiguous()
    bsz, seqlen, n_q, head_dim = q.shape
    rot = cos.shape[-1]
    qo = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=out_dtype, device=k.device)
    block_d, block_h, num_warps = launch_config(rot, max(n_q, k.shape[2]))
    stride_cb = 0 if cos.shape[0] == 1 else cos.stride(0)
    _rope_kernel[(bsz * seqlen,)](
        q, k, cos, sin, qo, ko,
        seqlen, n_q, k.shape[2],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        stride_cb, cos.stride(1),
        HALF=rot // 2, PASS=head_dim - rot, BLOCK_D=block_d, BLOCK_H=block_h,
        BLOCK_P=triton.next_power_of_2(max(head_dim - rot, 1)), BACKWARD=backward,
        num_warps=num_warps,
    )
    return qo, ko


@torch.library.custom_op("fastune::apply_rope", mutates_args=())
def _rope_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _rope(q, k, cos, sin, torch.promote_types(q.dtype, cos.dtype), backward=False)


@torch.library.custom_op("fastune::apply_rope_backward", mutates_args=())
def _rope_backward_op(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients for q and k (in ``dtype``, the inputs' dtype) from those of the outputs."""
    return _rope(dq, dk, cos, sin, dtype, backward=True)


@_rope_op.register_fake
def _(q, k, cos, sin):
    dtype = torch.promote_types(q.dtype, cos.dtype)
    return q.new_empty(q.shape, dtype=dtype), k.new_empty(k.shape, dtype=dtype)


@_rope_backward_op.register_fake
def _(dq, dk, cos, sin, dtype):
    return dq.new_empty(dq.shape, dtype=dtype), dk.new_empty(dk.shape, dtype=dtype)


def _setup_rope(ctx, inputs, output):
    q, _, cos, sin = inputs
    ctx.save_for_backward(cos, sin)
    ctx.dtype = q.dtype


@no_autocast
def _backward_rope(ctx, dq_out, dk_out):
    cos, sin = ctx.saved_tensors
    dq, dk = torch.ops.fastune.apply_rope_backward(dq_out, dk_out, cos, sin, ctx.dtype)
    return dq, dk, None, None


_rope_op.register_autograd(_backward_rope, setup_context=_setup_rope)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's ``apply_rotary_pos_emb`` for [B, S, H, D] q/k (inductor fuses it on CPU).
    Partial rotary: cos/sin of R < D dims rotate the first R dims of each head and
    pass the rest through (transformers' Phi-3)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    rot = cos.shape[-1]
    if rot < q.shape[-1]:
        (q_rot, q_pass), (k_rot, k_pass) = q.split([rot, q.shape[-1] - rot], -1), k.split([rot, k.shape[-1] - rot], -1)
        q_out, k_out = q_rot * cos + _rotate_half(q_rot) * sin, k_rot * cos + _rotate_half(k_rot) * sin
        return torch.cat([q_out, q_pass], -1), torch.cat([k_out, k_pass], -1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"apply_rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be "
                         "[B, S, H, D] with the same B, S and D")
    bsz, seqlen, _, head_dim = q.shape
    rot = cos.shape[-1] if cos.dim() == 3 else head_dim
    if (cos.shape != sin.shape or cos.dim() != 3 or cos.shape[0] not in (1, bsz)
            or cos.shape[1] != seqlen or not 0 < rot <= head_dim):
        raise ValueError(f"apply_rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must "
                         f"both be [{bsz} or 1, {seqlen}, R] with R <= {head_dim}")
    if rot % 2 or q.dtype != k.dtype:
        raise ValueError(f"apply_rope: rotary dim {rot} must be even and q ({q.dtype}), "
                         f"k ({k.dtype}) of one dtype")


@no_autocast
def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, S, Hq, D] and k [B, S, Hk, D] by per-token angles; cos/sin are
    [B or 1, S, R] in HF's half-split layout, R <= D (partial rotary: the first R dims
    of each head rotate, the rest pass through). Returns (q_rotated, k_rotated)."""
    _check(q, k, cos, sin)
    if use_triton(q):
        return torch.ops.fastune.apply_rope(q, k, cos, sin)
    return apply_rope_reference(q, k, cos, sin)


def aot_specs() -> list[dict]:
    """Launches for kernels/aot.py: head_dim 128 with 32 q / 8 kv heads (Llama 3 8B)
    and 16 / 8 (the bench shape), head_dim 64 with 32 / 8 (Llama 3.2 1B), and
    Phi-4-mini's partial rotary (96 of 128 dims, 24 heads), bf16; backward differs
    only in a constexpr."""
    ptrs = ("Q", "K", "COS", "SIN", "QO", "KO")
    ints = ("seq_len", "n_q_heads", "n_k_heads",
            "stride_qb", "stride_qs", "stride_qh", "stride_kb", "stride_ks", "stride_kh",
            "stride_qob", "stride_qos", "stride_qoh", "stride_kob", "stride_kos", "stride_koh",
            "stride_cb", "stride_cs")
    specs = []
    for head_dim, rot, n_heads, backward in ((128, 128, 32, False), (128, 128, 32, True), (128, 128, 16, False),
                                             (64, 64, 32, False), (128, 96, 24, False), (128, 96, 24, True)):
        block_d, block_h, num_warps = launch_config(rot, n_heads)
        constexprs = {"HALF": rot // 2, "PASS": head_dim - rot, "BLOCK_D": block_d, "BLOCK_H": block_h,
                      "BLOCK_P": triton.next_power_of_2(max(head_dim - rot, 1)), "BACKWARD": backward}
        signature = {**{p: "*bf16" for p in ptrs}, **{i: "i32" for i in ints},
                     **{c: "constexpr" for c in constexprs}}
        partial = f" R={rot}" if rot < head_dim else ""
        specs.append(dict(
            name=f"rope_{'bwd' if backward else 'fwd'} D={head_dim}{partial} H={n_heads} bf16",
            kernel=_rope_kernel, signature=signature, constexprs=constexprs, num_warps=num_warps,
            multiple_of_16=[i for i in ints if i.startswith("stride")],
        ))
    return specs

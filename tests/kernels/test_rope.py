"""apply_rope: reference vs float64, Triton (interpreter) vs reference on contiguous and
strided q/k, per-token (packed) positions, bf16 error bound. torch.compile: see
tests/test_model_kernels.py."""

import pytest
import torch

from fastune.kernels.dispatch import force_triton
from fastune.kernels.rope import apply_rope, apply_rope_reference
from tests.kernels.numerics import (assert_bf16_close, assert_close_to_truth, assert_max_rel_err,
                                    fwd_bwd, to_float64, upstream_grads)

# (batch, seq, q heads, kv heads, head_dim)
SHAPES = [(2, 5, 3, 1, 10), (2, 8, 4, 2, 32)]
DTYPES = [torch.float32, torch.bfloat16]


def rope_64(q, k, cos, sin):
    """out1 = x1 c1 - x2 s1, out2 = x2 c2 + x1 s2 per head, written out half by half,
    over the first R = cos.shape[-1] dims; the rest passes through (partial rotary)."""
    def rotate(x):
        rot = cos.shape[-1]
        half = rot // 2
        c, s = cos[:, :, None], sin[:, :, None]
        x1, x2, rest = x[..., :half], x[..., half:rot], x[..., rot:]
        return torch.cat((x1 * c[..., :half] - x2 * s[..., :half],
                          x2 * c[..., half:] + x1 * s[..., half:], rest), -1)
    return rotate(q), rotate(k)


def make(shape, dtype, packed=False, seed=0, rot=None):
    """q, k [B, S, H, D] and HF-layout cos/sin. ``packed``: per-row positions that restart
    (two documents in a row), cos/sin [B, S, R]; else positions 0..S-1 and [1, S, R].
    R = ``rot`` (partial rotary), default D."""
    bsz, seqlen, n_q, n_k, head_dim = shape
    rot = rot or head_dim
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, seqlen, n_q, head_dim, generator=gen).to(dtype)
    k = torch.randn(bsz, seqlen, n_k, head_dim, generator=gen).to(dtype)
    if packed:
        pos = torch.stack([torch.cat([torch.arange(3), torch.arange(seqlen - 3)]),
                           torch.arange(seqlen)] * (bsz // 2))
    else:
        pos = torch.arange(seqlen)[None]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rot, 2).double() / rot))
    angles = pos.double()[..., None] * inv_freq
    emb = torch.cat((angles, angles), -1)
    return [q, k, emb.cos().to(dtype), emb.sin().to(dtype)]


def on_fused_qkv(op, n_q, n_k):
    """``op`` on q and k sliced (strided views) out of one [B, S, Hq + 2 Hk, D] tensor,
    as from a fused qkv projection."""
    def run(qkv, cos, sin):
        return op(qkv[:, :, :n_q], qkv[:, :, n_q:n_q + n_k], cos, sin)
    return run


def forced(*args):
    with force_triton():
        return apply_rope(*args)


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_float64_math(shape):
    inputs = make(shape, torch.float32)
    got = fwd_bwd(apply_rope_reference, inputs)
    want = fwd_bwd(rope_64, to_float64(inputs), grad_dtype=torch.float32)
    # cos/sin get no gradient from the kernel; compare q, k outputs and dq, dk.
    assert_close_to_truth(got[0] + got[1][:2], want[0] + want[1][:2], rtol=1e-5, atol=1e-5)
    inputs = make(shape, torch.bfloat16)
    got = fwd_bwd(apply_rope_reference, inputs)
    want = fwd_bwd(rope_64, to_float64(inputs), grad_dtype=torch.bfloat16)
    assert_max_rel_err(got[0] + got[1][:2], want[0] + want[1][:2], tol=3 * 2**-8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "fused_qkv", "packed"])
def test_triton_matches_reference(shape, dtype, layout, rot=None):
    inputs = make(shape, dtype, packed=layout == "packed", rot=rot)
    fns = [forced, apply_rope_reference, rope_64]
    n_grads, names = 2, ["q_out", "k_out", "dq", "dk"]
    if layout == "fused_qkv":
        q, k, cos, sin = inputs
        inputs = [torch.cat([q, k, k], dim=2), cos, sin]
        fns = [on_fused_qkv(fn, shape[2], shape[3]) for fn in fns]
        n_grads, names = 1, ["q_out", "k_out", "dqkv"]
    kern_out, kern_grads = fwd_bwd(fns[0], inputs)
    ref_out, ref_grads = fwd_bwd(fns[1], inputs)
    assert kern_grads[n_grads:] == (None, None), "cos/sin must get no gradient from the kernel"
    kern, ref = kern_out + kern_grads[:n_grads], ref_out + ref_grads[:n_grads]
    if dtype == torch.float32:
        for name, a, b in zip(names, kern, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    else:
        true_out, true_grads = fwd_bwd(fns[2], to_float64(inputs), grad_dtype=dtype)
        assert_bf16_close(kern, ref, true_out + true_grads[:n_grads], names)


def test_general_cos_sin_halves():
    """The kernel does not assume the two halves of cos/sin are equal (HF layout)."""
    q, k, _, _ = make((1, 4, 2, 1, 8), torch.float32)
    cos, sin = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    kern_out, kern_grads = fwd_bwd(forced, [q, k, cos, sin])
    ref_out, ref_grads = fwd_bwd(apply_rope_reference, [q, k, cos, sin])
    for a, b in zip(kern_out + kern_grads[:2], ref_out + ref_grads[:2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bad_shapes_raise_one_clear_error():
    q, k, cos, sin = make((1, 4, 2, 1, 8), torch.float32)
    with pytest.raises(ValueError, match="apply_rope: cos"):
        apply_rope(q, k, cos[:, :3], sin[:, :3])
    with pytest.raises(ValueError, match="apply_rope: q"):
        apply_rope(q, k[:, :3], cos, sin)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "fused_qkv"])
def test_partial_rotary_triton_matches_reference(dtype, layout):
    """cos/sin of R < D dims (Phi-4-mini's partial_rotary_factor): 12 of 20 dims rotate,
    the rest pass through, forward and backward."""
    test_triton_matches_reference((2, 5, 3, 1, 20), dtype, layout, rot=12)


def test_partial_rotary_passes_the_last_dims_through():
    q, k, cos, sin = make((2, 5, 3, 1, 20), torch.float32, rot=12)
    for fn in (forced, apply_rope_reference):
        (q_out, k_out), (dq, dk, *_) = fwd_bwd(fn, [q, k, cos, sin])
        assert torch.equal(q_out[..., 12:], q[..., 12:]) and torch.equal(k_out[..., 12:], k[..., 12:])
        upstream = upstream_grads([q_out, k_out])
        assert torch.equal(dq[..., 12:], upstream[0][..., 12:]) and torch.equal(dk[..., 12:], upstream[1][..., 12:])

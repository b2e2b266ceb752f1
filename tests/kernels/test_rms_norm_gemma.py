"""rms_norm and add_rms_norm with Gemma's numerics (weight offset 1, product in fp32 and
cast once): the reference equals transformers' Gemma2RMSNorm / Gemma3RMSNorm exactly, and
the Triton kernels' constexpr variant (interpreter) matches it within the bf16 rule."""

import pytest
import torch
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

from fastune.kernels.dispatch import force_triton
from fastune.kernels.rms_norm import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference
from tests.kernels.numerics import assert_bf16_close, fwd_bwd, to_float64

EPS = 1e-6
GEMMA = dict(weight_offset=1.0, weight_in_fp32=True)
SHAPES = [(3, 5, 67), (2, 4, 128)]


def gemma_64(x, w, eps):
    return (1 + w) * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def make(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 2).to(dtype)
    # Gemma stores the scale minus one: weights around 0.
    w = (0.5 * torch.randn(shape[-1], generator=gen)).to(dtype)
    return x, torch.randn(shape, generator=gen).to(dtype), w


def ours(residual, triton, **numerics):
    def fn(*args):
        with force_triton(triton):
            if residual:
                return add_rms_norm(*args, EPS, **numerics)
            return rms_norm(*args, EPS, **numerics)
    return fn


@pytest.mark.parametrize("hf_norm", [Gemma2RMSNorm, Gemma3RMSNorm])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_transformers_gemma_rms_norm(hf_norm, dtype):
    x, _, w = make((3, 5, 67), dtype)
    norm = hf_norm(67, eps=EPS).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(w)
    want = fwd_bwd(lambda x, w: torch.func.functional_call(norm, {"weight": w}, (x,)), [x, w])
    got = fwd_bwd(lambda x, w: rms_norm_reference(x, w, EPS, **GEMMA), [x, w])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("residual", [False, True], ids=["rms_norm", "add_rms_norm"])
def test_triton_matches_reference(shape, dtype, residual):
    x, r, w = make(shape, dtype)
    inputs = [x, r, w] if residual else [x, w]
    kern_out, kern_grads = fwd_bwd(ours(residual, True, **GEMMA), inputs)
    ref_out, ref_grads = fwd_bwd(ours(residual, False, **GEMMA), inputs)
    assert kern_out[-1].dtype == dtype
    names = [f"out{i}" for i in range(len(ref_out))] + ["dx", "dresidual", "dweight"][-len(ref_grads):]
    if dtype == torch.float32:
        for name, a, b in zip(names, kern_out + kern_grads, ref_out + ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        return

    def truth(*args):
        if residual:
            return args[0] + args[1], gemma_64(args[0] + args[1], args[2], EPS)
        return gemma_64(*args, EPS)

    true_out, true_grads = fwd_bwd(truth, to_float64(inputs), grad_dtype=dtype)
    assert_bf16_close(kern_out + kern_grads, ref_out + ref_grads, true_out + true_grads, names)


def test_fp32_weight_bf16_input_gives_bf16_like_gemma():
    """Gemma casts the fp32 product back to x's dtype (Llama promotes to the weight's)."""
    x, _, w = make((3, 5, 67), torch.bfloat16)
    inputs = [x, w.float()]
    kern_out, kern_grads = fwd_bwd(ours(False, True, **GEMMA), inputs)
    ref_out, ref_grads = fwd_bwd(ours(False, False, **GEMMA), inputs)
    assert kern_out[0].dtype == ref_out[0].dtype == torch.bfloat16
    assert kern_grads[1].dtype == torch.float32
    true_out, true_grads = fwd_bwd(lambda x, w: gemma_64(x, w, EPS), to_float64(inputs),
                                   grad_dtype=torch.bfloat16)
    assert_bf16_close(kern_out + kern_grads, ref_out + ref_grads, true_out + true_grads,
                      ["y", "dx", "dweight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offset_alone_rounds_the_scale_like_torch(dtype):
    """Offset without the fp32 product: (w + 1) rounds to w's dtype first, as in PyTorch."""
    x, _, w = make((3, 5, 67), dtype)
    kern = fwd_bwd(ours(False, True, weight_offset=1.0), [x, w])
    ref = fwd_bwd(ours(False, False, weight_offset=1.0), [x, w])
    if dtype == torch.float32:
        torch.testing.assert_close(kern, ref, rtol=1e-5, atol=1e-5)
    else:
        truth = fwd_bwd(lambda x, w: gemma_64(x, w, EPS), to_float64([x, w]), grad_dtype=dtype)
        assert_bf16_close(kern[0] + kern[1], ref[0] + ref[1], truth[0] + truth[1],
                          ["y", "dx", "dweight"])
    # and the offset is really applied
    assert not torch.allclose(kern[0][0].float(), fwd_bwd(ours(False, True), [x, w])[0][0].float())

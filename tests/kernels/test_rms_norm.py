"""rms_norm and add_rms_norm: reference vs float64, Triton (interpreter) vs reference,
bf16 error bound, frozen weight, mixed dtypes. torch.compile of all of A's ops, on both
paths, is one test in tests/test_model_kernels.py (compiles are slow here)."""

import pytest
import torch

from fastune.kernels.dispatch import force_triton
from fastune.kernels.rms_norm import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference
from tests.kernels.numerics import (assert_bf16_close, assert_close_to_truth, assert_max_rel_err,
                                    fwd_bwd, to_float64)

EPS = 1e-5
SHAPES = [(3, 5, 67), (2, 4, 128)]
DTYPES = [torch.float32, torch.bfloat16]


def rms_norm_64(x, w, eps):
    """The math, with no intermediate rounding: w * x / sqrt(mean(x^2) + eps)."""
    return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def add_rms_norm_64(x, r, w, eps):
    return x + r, rms_norm_64(x + r, w, eps)


def make(shape, dtype, residual=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 2).to(dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=gen)).to(dtype)
    if not residual:
        return [x, w, EPS]
    return [x, torch.randn(shape, generator=gen).to(dtype), w, EPS]


def forced(fn):
    def run(*args):
        with force_triton():
            return fn(*args)
    return run


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_float64_math(shape):
    for ref, truth, residual in ((rms_norm_reference, rms_norm_64, False),
                                 (add_rms_norm_reference, add_rms_norm_64, True)):
        inputs = make(shape, torch.float32, residual)
        got = fwd_bwd(ref, inputs)
        want = fwd_bwd(truth, to_float64(inputs), grad_dtype=torch.float32)
        assert_close_to_truth(got[0] + got[1], want[0] + want[1], rtol=1e-5, atol=1e-5)
        # bf16: within a few bf16 roundings (2^-8 relative to the largest value) of the truth.
        inputs = make(shape, torch.bfloat16, residual)
        got = fwd_bwd(ref, inputs)
        want = fwd_bwd(truth, to_float64(inputs), grad_dtype=torch.bfloat16)
        assert_max_rel_err(got[0] + got[1], want[0] + want[1], tol=4 * 2**-8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("residual", [False, True], ids=["rms_norm", "add_rms_norm"])
def test_triton_matches_reference(shape, dtype, residual):
    op, ref, truth = ((add_rms_norm, add_rms_norm_reference, add_rms_norm_64) if residual
                      else (rms_norm, rms_norm_reference, rms_norm_64))
    inputs = make(shape, dtype, residual)
    kern_out, kern_grads = fwd_bwd(forced(op), inputs)
    ref_out, ref_grads = fwd_bwd(ref, inputs)
    names = [f"out{i}" for i in range(len(ref_out))] + ["dx", "dresidual", "dweight"][-len(ref_grads):]
    if dtype == torch.float32:
        for name, a, b in zip(names, kern_out + kern_grads, ref_out + ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    else:
        true_out, true_grads = fwd_bwd(truth, to_float64(inputs), grad_dtype=dtype)
        assert_bf16_close(kern_out + kern_grads, ref_out + ref_grads, true_out + true_grads, names)


@pytest.mark.parametrize("layout", ["row_strided", "transposed"])
def test_non_contiguous_input(layout):
    """x is a slice of a wider tensor (rows strided), or a transposed slice (a copy is made)."""
    def view(wide):
        x = wide[..., :67]
        return x if layout == "row_strided" else x.transpose(0, 1)

    wide, w, eps = make((3, 5, 100), torch.float32)
    inputs = [wide, w[:67], eps]
    kern = fwd_bwd(lambda t, w, eps: forced(rms_norm)(view(t), w, eps), inputs)
    ref = fwd_bwd(lambda t, w, eps: rms_norm_reference(view(t), w, eps), inputs)
    for a, b in zip(kern[0] + kern[1], ref[0] + ref[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_frozen_weight_gets_no_gradient():
    x, w, eps = make((3, 5, 67), torch.bfloat16)
    x = x.requires_grad_()
    with force_triton():
        y = rms_norm(x, w, eps)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    (dx_ref,) = torch.autograd.grad(rms_norm_reference(x, w, eps), x, torch.ones_like(y))
    assert w.grad is None
    torch.testing.assert_close(dx, dx_ref, rtol=2**-7, atol=2**-7)


def test_fp32_weight_bf16_input_promotes_like_hf():
    x, w, eps = make((3, 5, 67), torch.bfloat16)
    w = w.float()
    inputs = [x, w, eps]
    kern_out, kern_grads = fwd_bwd(forced(rms_norm), inputs)
    ref_out, ref_grads = fwd_bwd(rms_norm_reference, inputs)
    assert kern_out[0].dtype == ref_out[0].dtype == torch.float32
    assert kern_grads[0].dtype == torch.bfloat16 and kern_grads[1].dtype == torch.float32
    true_out, true_grads = fwd_bwd(rms_norm_64, to_float64(inputs), grad_dtype=torch.float32)
    assert_bf16_close(kern_out + kern_grads, ref_out + ref_grads, true_out + true_grads,
                      ["y", "dx", "dweight"])


def test_bad_shapes_raise_one_clear_error():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="rms_norm: weight shape"):
        rms_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="add_rms_norm: residual"):
        add_rms_norm(x, torch.randn(2, 7), torch.ones(8))

"""swiglu: reference vs float64, Triton (interpreter) vs reference, bf16 error bound,
in-place backward launch. torch.compile: see tests/test_model_kernels.py."""

import pytest
import torch

from fastune.kernels.dispatch import force_triton
from fastune.kernels.swiglu import swiglu, swiglu_bwd_into, swiglu_reference
from tests.kernels.numerics import (assert_bf16_close, assert_close_to_truth, assert_max_rel_err,
                                    fwd_bwd, to_float64)

SHAPES = [(3, 5, 67), (4, 256)]
DTYPES = [torch.float32, torch.bfloat16]


def swiglu_64(g, u):
    return g / (1 + torch.exp(-g)) * u


def make(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(3 * torch.randn(shape, generator=gen)).to(dtype), torch.randn(shape, generator=gen).to(dtype)]


def forced(*args):
    with force_triton():
        return swiglu(*args)


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_float64_math(shape):
    inputs = make(shape, torch.float32)
    got = fwd_bwd(swiglu_reference, inputs)
    want = fwd_bwd(swiglu_64, to_float64(inputs), grad_dtype=torch.float32)
    assert_close_to_truth(got[0] + got[1], want[0] + want[1], rtol=1e-5, atol=1e-6)
    inputs = make(shape, torch.bfloat16)
    got = fwd_bwd(swiglu_reference, inputs)
    want = fwd_bwd(swiglu_64, to_float64(inputs), grad_dtype=torch.bfloat16)
    assert_max_rel_err(got[0] + got[1], want[0] + want[1], tol=3 * 2**-8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(shape, dtype):
    inputs = make(shape, dtype)
    kern_out, kern_grads = fwd_bwd(forced, inputs)
    ref_out, ref_grads = fwd_bwd(swiglu_reference, inputs)
    names = ["out", "dgate", "dup"]
    if dtype == torch.float32:
        for name, a, b in zip(names, kern_out + kern_grads, ref_out + ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    else:
        true_out, true_grads = fwd_bwd(swiglu_64, to_float64(inputs), grad_dtype=dtype)
        assert_bf16_close(kern_out + kern_grads, ref_out + ref_grads, true_out + true_grads, names)


def test_backward_may_write_over_its_input():
    gate, up = make((3, 67), torch.float32)
    dout = torch.randn(3, 67)
    expected = swiglu_bwd_into(dout, gate, up, torch.empty_like(gate), torch.empty_like(up))
    buf = dout.clone()
    dgate, dup = swiglu_bwd_into(buf, gate, up, buf, torch.empty_like(up))
    assert dgate.data_ptr() == buf.data_ptr()
    torch.testing.assert_close((dgate, dup), expected, rtol=0, atol=0)


def test_mismatched_inputs_raise_one_clear_error():
    with pytest.raises(ValueError, match="swiglu: gate"):
        swiglu(torch.randn(2, 3), torch.randn(2, 4))

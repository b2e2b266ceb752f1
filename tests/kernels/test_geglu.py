"""geglu (tanh GELU): reference vs float64 and vs transformers' gelu_pytorch_tanh, Triton (interpreter) vs reference, bf16 error bound,
in-place backward launch. torch.compile: see tests/test_model_kernels.py."""

import math

import pytest
import torch

from fastune.kernels.dispatch import force_triton
from fastune.kernels.geglu import geglu, geglu_bwd_into, geglu_reference
from tests.kernels.numerics import (assert_bf16_close, assert_close_to_truth, assert_max_rel_err,
                                    fwd_bwd, to_float64)

SHAPES = [(3, 5, 67), (4, 256)]
DTYPES = [torch.float32, torch.bfloat16]


def geglu_64(g, u):
    return 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3))) * u


def make(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(3 * torch.randn(shape, generator=gen)).to(dtype), torch.randn(shape, generator=gen).to(dtype)]


def forced(*args):
    with force_triton():
        return geglu(*args)


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_float64_math(shape):
    inputs = make(shape, torch.float32)
    got = fwd_bwd(geglu_reference, inputs)
    want = fwd_bwd(geglu_64, to_float64(inputs), grad_dtype=torch.float32)
    # atol 1e-5: in the far negative tail (gate ~ -9) dgelu is ~1e-6, and 1 - t^2
    # cancels to 0 in fp32 in torch's backward as in ours.
    assert_close_to_truth(got[0] + got[1], want[0] + want[1], rtol=1e-5, atol=1e-5)
    inputs = make(shape, torch.bfloat16)
    got = fwd_bwd(geglu_reference, inputs)
    want = fwd_bwd(geglu_64, to_float64(inputs), grad_dtype=torch.bfloat16)
    assert_max_rel_err(got[0] + got[1], want[0] + want[1], tol=3 * 2**-8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(shape, dtype):
    inputs = make(shape, dtype)
    kern_out, kern_grads = fwd_bwd(forced, inputs)
    ref_out, ref_grads = fwd_bwd(geglu_reference, inputs)
    names = ["out", "dgate", "dup"]
    true_out, true_grads = fwd_bwd(geglu_64, to_float64(inputs), grad_dtype=dtype)
    if dtype == torch.float32:
        # Against the truth, not torch: the kernel keeps the tails' small gradients that
        # torch's fp32 backward flushes to 0 (see kernels/geglu.py).
        assert_close_to_truth(kern_out + kern_grads, true_out + true_grads, rtol=1e-5, atol=1e-6,
                              names=names)
        torch.testing.assert_close(kern_out + kern_grads, ref_out + ref_grads, rtol=1e-5, atol=1e-5)
    else:
        assert_bf16_close(kern_out + kern_grads, ref_out + ref_grads, true_out + true_grads, names)


def test_backward_may_write_over_its_input():
    gate, up = make((3, 67), torch.float32)
    dout = torch.randn(3, 67)
    expected = geglu_bwd_into(dout, gate, up, torch.empty_like(gate), torch.empty_like(up))
    buf = dout.clone()
    dgate, dup = geglu_bwd_into(buf, gate, up, buf, torch.empty_like(up))
    assert dgate.data_ptr() == buf.data_ptr()
    torch.testing.assert_close((dgate, dup), expected, rtol=0, atol=0)


def test_mismatched_inputs_raise_one_clear_error():
    with pytest.raises(ValueError, match="geglu: gate"):
        geglu(torch.randn(2, 3), torch.randn(2, 4))


def test_reference_is_transformers_gelu_pytorch_tanh():
    """Gemma configs name the activation gelu_pytorch_tanh; the model maps it to geglu."""
    from transformers.activations import ACT2FN

    gate, up = make((4, 256), torch.bfloat16)
    torch.testing.assert_close(geglu_reference(gate, up), ACT2FN["gelu_pytorch_tanh"](gate) * up,
                               rtol=0, atol=0)

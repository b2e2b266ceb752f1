"""nf4_dequantize: the Triton kernel (interpreter) equals torchao's dequantization bit for
bit, torchao's format decoded independently in float64, dispatch, compile, bad layout.

The kernel has no tl.dot, so bf16 runs under the interpreter as it is."""

import pytest
import torch
from torchao.quantization import to_nf4

from fastune.kernels.dispatch import force_triton
from fastune.kernels.nf4 import NF4Error, is_nf4, nf4_dequantize, nf4_parts

# (shape, block_size, scaler_block_size). numel must be a multiple of block * scaler
# block; the odd cases give a partly masked last program and non-power-of-2 groups.
CASES = [((9, 448), 64, 7), ((5, 96), 32, 5), ((128, 256), 64, 256)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def make_nf4(shape, block, scaler_block, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    return weight, to_nf4(weight, block, scaler_block)


@pytest.mark.parametrize("shape,block,scaler_block", CASES)
@pytest.mark.parametrize("weight_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_kernel_is_bit_exact(shape, block, scaler_block, weight_dtype, out_dtype):
    _, nf4 = make_nf4(shape, block, scaler_block, weight_dtype)
    with force_triton():
        dense = nf4_dequantize(nf4, out_dtype)
    expected = nf4.to(out_dtype)
    assert dense.dtype == out_dtype and dense.shape == shape
    mismatches = (dense != expected).sum().item()
    assert mismatches == 0, f"{mismatches} of {dense.numel()} elements differ from torchao"


def decode_float64(nf4) -> torch.Tensor:
    """The NF4 format decoded from its inner tensors in float64, independently of
    torchao's code: high nibble first, double-quantized block scalers."""
    parts, (block, scaler_block, rows, cols) = nf4_parts(nf4)
    qdata, qscalers, qfactor, mean, table = parts
    codes = torch.stack([qdata >> 4, qdata & 0xF], dim=-1).flatten().long()
    factor = qfactor.double().repeat_interleave(scaler_block)
    scalers = qscalers.double() / factor + mean.double()
    return (table.double()[codes] * scalers.repeat_interleave(block)).view(rows, cols)


@pytest.mark.parametrize("shape,block,scaler_block", CASES)
def test_format_decoded_in_float64(shape, block, scaler_block):
    weight, nf4 = make_nf4(shape, block, scaler_block, torch.float32)
    truth = decode_float64(nf4)
    with force_triton():
        kernel = nf4_dequantize(nf4, torch.float32)
    # fp32 steps (one division, one add, one product) round three times at most.
    torch.testing.assert_close(kernel.double(), truth, rtol=4e-7, atol=1e-9)
    torch.testing.assert_close(nf4.to(torch.float32).double(), truth, rtol=4e-7, atol=1e-9)
    # And it approximates the weight: codes are chosen against the true block absmax,
    # so |error| <= half the widest code gap ((1 - 0.6962) / 2) x absmax, plus the
    # int8 scaler's error, at most half a step 1 / quantization_factor.
    absmax = weight.view(-1, block).abs().amax(dim=1, keepdim=True).double()
    scaler_step = 1 / nf4.quantization_factor.double().repeat_interleave(scaler_block)[:, None]
    err = (truth - weight.double()).view(-1, block).abs()
    assert (err <= (0.1519 * absmax + 0.5 * scaler_step) * (1 + 1e-5)).all()


def test_dispatch_without_force_is_torchao():
    _, nf4 = make_nf4((5, 96), 32, 5, torch.bfloat16)
    assert is_nf4(nf4) and not is_nf4(torch.zeros(2))
    assert torch.equal(nf4_dequantize(nf4), nf4.to(torch.bfloat16))
    assert nf4_dequantize(nf4, torch.float32).dtype == torch.float32


def test_transposed_weight_is_rejected():
    _, nf4 = make_nf4((5, 96), 32, 5, torch.bfloat16)
    with pytest.raises(NF4Error, match="contiguous 2-D NF4Tensor"), force_triton():
        nf4_dequantize(nf4.t())


@pytest.mark.slow
def test_compiled_kernel_matches_eager():
    _, nf4 = make_nf4((9, 448), 64, 7, torch.bfloat16)
    with force_triton():
        eager = nf4_dequantize(nf4, torch.float32)
        compiled = torch.compile(lambda w: nf4_dequantize(w, torch.float32), fullgraph=True)(nf4)
    assert torch.equal(compiled, eager)

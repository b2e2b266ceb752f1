"""lora_linear: reference vs the float64 closed form; custom ops (forced path) vs float64
within the bf16 rule (fp32: a norm-wise bound), for dense and NF4 base weights; what is
saved for backward, which inputs get gradients, bad input, compile.

(Named test_lora_linear.py, not test_lora.py: tests/test_lora.py exists, and test
modules without __init__.py files must have unique basenames.)

The op has no tl.dot (its matmuls are torch.mm); the NF4 dequant kernel runs in bf16
under the interpreter as it is."""

import pytest
import torch
from torchao.quantization import to_nf4

from fastune.kernels.dispatch import force_triton
from fastune.kernels.lora import LoRAKernelError, lora_linear
from tests.kernels.numerics import (
    assert_close_to_truth,
    assert_within_dtype_rule,
    fwd_bwd,
    to_float64,
    upstream_grads,
)

SCALE = 1.7  # not a power of two, so that scaling rounds
# (x shape, out features, rank): odd, then round.
SHAPES = [((3, 5, 67), 33, 3), ((4, 64), 128, 16)]
# x [N, 64], weight [48, 64]: 48 NF4 blocks of 64, scaler blocks of 4 blocks.
NF4_SHAPE, NF4_BLOCKS = ((3, 5, 64), 48, 4), (64, 4)


def make_case(x_shape, out_features, rank, dtype, seed=0):
    """x, W, A, B, bias at trained-ish scales (B non-zero, unlike a fresh adapter)."""
    gen = torch.Generator().manual_seed(seed)
    in_features = x_shape[-1]
    x = torch.randn(x_shape, generator=gen)
    weight = torch.randn(out_features, in_features, generator=gen) / in_features**0.5
    lora_a = torch.randn(rank, in_features, generator=gen) / in_features**0.5
    lora_b = torch.randn(out_features, rank, generator=gen) / rank**0.5
    bias = torch.randn(out_features, generator=gen) * 0.1
    return [t.to(dtype) for t in (x, weight, lora_a, lora_b, bias)]


def op(weight, bias=None):
    """lora_linear as a function of (x, A, B[, trainable bias]); W and a frozen bias are
    closed over so that they get no gradient."""
    def fn(x, lora_a, lora_b, trainable_bias=None):
        return lora_linear(x, weight, lora_a, lora_b, SCALE,
                           bias if trainable_bias is None else trainable_bias)
    return fn


def run(fn, inputs, triton, grad_dtype=None):
    """fwd_bwd with the Triton path forced (True) or forbidden (False) on CPU."""
    with force_triton(triton):
        return fwd_bwd(fn, inputs, grad_dtype)


def closed_form(x, weight, lora_a, lora_b, bias, dy):
    """Forward and the backward formulas of the kernels/lora.py docstring, in float64."""
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    xa = x2 @ lora_a.T
    y = x2 @ weight.T + bias + SCALE * xa @ lora_b.T
    dyb = dy2 @ lora_b
    dx = dy2 @ weight + SCALE * dyb @ lora_a
    return (y.view(dy.shape), dx.view(x.shape), SCALE * dyb.T @ x2, SCALE * dy2.T @ xa, dy2.sum(0))


@pytest.mark.parametrize("x_shape,out_features,rank", SHAPES)
def test_reference_matches_float64_closed_form(x_shape, out_features, rank):
    x, weight, lora_a, lora_b, bias = make_case(x_shape, out_features, rank, torch.float32)
    out, grads = run(op(weight), [x, lora_a, lora_b, bias], triton=False)
    dy = upstream_grads(out)[0].double()
    truth = closed_form(*to_float64([x, weight, lora_a, lora_b, bias]), dy)
    assert_close_to_truth(out + grads, truth, rtol=1e-5, atol=1e-5,
                          names=["y", "dx", "dA", "dB", "dbias"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_shape,out_features,rank", SHAPES)
@pytest.mark.parametrize("bias_kind", ["none", "trainable", "frozen"])
def test_kernel_within_dtype_rule(dtype, x_shape, out_features, rank, bias_kind):
    x, weight, lora_a, lora_b, bias = make_case(x_shape, out_features, rank, dtype)
    inputs = [x, lora_a, lora_b] + ([bias] if bias_kind == "trainable" else [])
    frozen = bias if bias_kind == "frozen" else None
    frozen64 = bias.double() if bias_kind == "frozen" else None
    kernel = run(op(weight, frozen), inputs, triton=True)
    eager = run(op(weight, frozen), inputs, triton=False)
    truth = run(op(weight.double(), frozen64), to_float64(inputs), False, grad_dtype=dtype)
    names = ["y", "dx", "dA", "dB", "dbias"][: 1 + len(inputs)]
    assert_within_dtype_rule(kernel[0] + kernel[1], eager[0] + eager[1], truth[0] + truth[1], names=names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_with_nf4_weight_within_dtype_rule(dtype):
    """An NF4 base weight (quantized from bf16): the custom ops dequantize it with the
    Triton kernel, the reference with torchao; truth uses the dequantized weight."""
    x, weight, lora_a, lora_b, _ = make_case(*NF4_SHAPE, dtype)
    nf4 = to_nf4(weight.to(torch.bfloat16), *NF4_BLOCKS)
    inputs = [x, lora_a, lora_b]
    kernel = run(op(nf4), inputs, triton=True)
    eager = run(op(nf4), inputs, triton=False)
    truth = run(op(nf4.to(torch.float64)), to_float64(inputs), False, grad_dtype=dtype)
    assert_within_dtype_rule(kernel[0] + kernel[1], eager[0] + eager[1], truth[0] + truth[1],
                      names=["y", "dx", "dA", "dB"])


def saved_in_forward(fn, *args):
    """The tensors autograd saves while ``fn(*args)`` runs."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn(*args)
    return out, saved


@pytest.mark.parametrize("quantized", [False, True])
def test_saves_x_and_rank_r_only(quantized):
    (x_shape, out_features, rank) = NF4_SHAPE
    x, weight, lora_a, lora_b, _ = make_case(x_shape, out_features, rank, torch.bfloat16)
    weight = to_nf4(weight, *NF4_BLOCKS) if quantized else weight
    x, lora_a, lora_b = (t.requires_grad_() for t in (x, lora_a, lora_b))
    with force_triton():
        y, saved = saved_in_forward(lora_linear, x, weight, lora_a, lora_b, SCALE)
    n_tokens = x.numel() // x.shape[-1]
    shapes = [tuple(t.shape) for t in saved if t.is_floating_point()]
    assert any(t is x for t in saved)
    assert (n_tokens, rank) in shapes  # x·Aᵀ
    assert tuple(y.shape) not in shapes and (n_tokens, out_features) not in shapes  # not the output
    if quantized:  # the dense dequantized weight is a temporary, never saved
        assert (out_features, x_shape[-1]) not in shapes
        assert any(t.dtype == torch.uint8 for t in saved)  # the packed NF4 codes instead
    else:
        assert any(t is weight for t in saved)  # the parameter itself, not a copy


def test_gradients_only_where_needed():
    x, weight, lora_a, lora_b, bias = make_case((3, 5, 67), 33, 3, torch.float32)
    lora_a.requires_grad_()
    lora_b.requires_grad_()
    with force_triton():
        lora_linear(x, weight, lora_a, lora_b, SCALE, bias).sum().backward()
    assert lora_a.grad is not None and lora_b.grad is not None
    assert x.grad is None and weight.grad is None and bias.grad is None


def test_trainable_base_weight_is_rejected_but_inference_allowed():
    x, weight, lora_a, lora_b, _ = make_case((3, 5, 67), 33, 3, torch.float32)
    weight.requires_grad_()
    with pytest.raises(LoRAKernelError, match="base weight must be frozen"):
        lora_linear(x, weight, lora_a, lora_b, SCALE)
    with torch.no_grad():
        lora_linear(x, weight, lora_a, lora_b, SCALE)


@pytest.mark.parametrize("change,message", [
    (lambda c: c.__setitem__(2, c[2][:, :-1]), "shapes do not fit"),
    (lambda c: c.__setitem__(3, c[3].double()), "cast the adapter first"),
    (lambda c: c.__setitem__(4, c[4][:-1]), "bias shape"),
])
def test_bad_arguments_get_one_line(change, message):
    case = make_case((3, 5, 67), 33, 3, torch.float32)
    change(case)
    x, weight, lora_a, lora_b, bias = case
    with pytest.raises(LoRAKernelError, match=message) as err:
        lora_linear(x, weight, lora_a, lora_b, SCALE, bias)
    assert "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("triton,quantized", [(False, False), (True, False), (True, True)])
def test_compiled_matches_eager(triton, quantized):
    """fullgraph=True: no graph break, forward and backward equal eager's."""
    x, weight, lora_a, lora_b, bias = make_case(*NF4_SHAPE, torch.float32)
    weight = to_nf4(weight, *NF4_BLOCKS) if quantized else weight
    fn = op(weight)
    eager = run(fn, [x, lora_a, lora_b, bias], triton)
    compiled = run(torch.compile(fn, fullgraph=True), [x, lora_a, lora_b, bias], triton)
    for c, e in zip(compiled[0] + compiled[1], eager[0] + eager[1]):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_reference_with_nf4_weight():
    """torchao's NF4Tensor traces with fullgraph=True on the reference path too. Inductor
    dequantizes without torchao's intermediate bf16 roundings, so W may move by one bf16
    ulp (relative 2^-8): y and dx stay within that bound, dA and dB do not involve W."""
    x, weight, lora_a, lora_b, bias = make_case(*NF4_SHAPE, torch.float32)
    nf4 = to_nf4(weight.to(torch.bfloat16), *NF4_BLOCKS)
    fn = op(nf4)
    (y, *_), (dx, d_a, d_b, d_bias) = run(fn, [x, lora_a, lora_b, bias], False)
    (cy, *_), (cdx, cd_a, cd_b, cd_bias) = run(torch.compile(fn, fullgraph=True),
                                               [x, lora_a, lora_b, bias], False)
    dense = nf4.to(torch.float32).abs()
    dy = upstream_grads([y])[0]
    ulp = 2.0**-8
    assert ((cy - y).abs() <= ulp * x.abs() @ dense.T + 1e-5).all()
    assert ((cdx - dx).abs() <= ulp * dy.abs() @ dense + 1e-5).all()
    for c, e in [(cd_a, d_a), (cd_b, d_b), (cd_bias, d_bias)]:
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)

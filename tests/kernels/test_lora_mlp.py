"""lora_mlp: reference vs float64; custom ops with the Triton SwiGLU and NF4 kernels
(interpreter) vs float64 within the bf16 rule (fp32: a norm-wise bound), for dense and
NF4 base weights; what is saved for backward, gradients only where needed, bad input,
compile.

The kernels have no tl.dot (the matmuls are torch.mm), so bf16 runs under the
interpreter as it is."""

import pytest
import torch
from torchao.quantization import to_nf4

from fastune.kernels.dispatch import force_triton
from fastune.kernels.lora import LoRAKernelError
from fastune.kernels.lora_mlp import lora_mlp
from tests.kernels.numerics import (
    assert_close_to_truth,
    assert_within_dtype_rule,
    fwd_bwd,
    to_float64,
)

SCALE = 1.7
# (x shape, intermediate size, rank): odd (the SwiGLU grid's last program is masked), round.
SHAPES = [((3, 5, 40), 72, 3), ((4, 64), 128, 16)]
# Weights of 72 x 40: 45 NF4 blocks of 64 in 9 scaler blocks; two dequant programs each.
NF4_SHAPE, NF4_BLOCKS = ((3, 5, 40), 72, 3), (64, 5)
GRAD_NAMES = ["y", "dx", "dA gate", "dB gate", "dA up", "dB up", "dA down", "dB down"]


def make_case(x_shape, inter, rank, dtype, seed=0):
    """x, the three frozen weights, and the six adapter matrices (B non-zero)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = x_shape[-1]

    def rand(*shape, fan_in):
        return (torch.randn(shape, generator=gen) / fan_in**0.5).to(dtype)

    x = torch.randn(x_shape, generator=gen).to(dtype)
    weights = [rand(inter, hidden, fan_in=hidden), rand(inter, hidden, fan_in=hidden),
               rand(hidden, inter, fan_in=inter)]
    adapters = [rand(rank, hidden, fan_in=hidden), rand(inter, rank, fan_in=rank),
                rand(rank, hidden, fan_in=hidden), rand(inter, rank, fan_in=rank),
                rand(rank, inter, fan_in=inter), rand(hidden, rank, fan_in=rank)]
    return x, weights, adapters


def op(weights):
    """lora_mlp as a function of (x, Ag, Bg, Au, Bu, Ad, Bd); the frozen weights are
    closed over."""
    gate_w, up_w, down_w = weights

    def fn(x, gate_a, gate_b, up_a, up_b, down_a, down_b):
        return lora_mlp(x, gate_w, gate_a, gate_b, up_w, up_a, up_b, down_w, down_a, down_b, SCALE)
    return fn


def run(fn, inputs, triton, grad_dtype=None):
    with force_triton(triton):
        return fwd_bwd(fn, inputs, grad_dtype)


@pytest.mark.parametrize("x_shape,inter,rank", SHAPES)
def test_reference_matches_float64(x_shape, inter, rank):
    x, weights, adapters = make_case(x_shape, inter, rank, torch.float32)
    out, grads = run(op(weights), [x, *adapters], triton=False)
    truth, true_grads = run(op(to_float64(weights)), to_float64([x, *adapters]), False,
                            grad_dtype=torch.float32)
    # Three chained projections and their backward: fp32 rounding of O(1) values summed
    # over ~100 terms reaches 1e-5 absolute where gradients cancel to near zero.
    assert_close_to_truth(out + grads, truth + true_grads, rtol=1e-5, atol=5e-5, names=GRAD_NAMES)


def pooled_results(make, dtype, seeds=range(4)):
    """(kernel, eager, truth) result lists, each tensor flattened and concatenated over
    several random draws. Three chained bf16 projections make the max error of one small
    draw noisy (kernel/eager ratios of 0.4 to 2.0 across single draws, at most 1.3 when
    pooled over four), so the rule is applied to the pooled sample."""
    runs = []
    for seed in seeds:
        fn, fn64, inputs = make(seed)
        kernel = run(fn, inputs, triton=True)
        eager = run(fn, inputs, triton=False)
        truth = run(fn64, to_float64(inputs), False, grad_dtype=dtype)
        runs.append([r[0] + r[1] for r in (kernel, eager, truth)])
    return [[torch.cat([draw[which][i].flatten() for draw in runs]) for i in range(len(GRAD_NAMES))]
            for which in range(3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_shape,inter,rank", SHAPES)
def test_kernel_within_dtype_rule(dtype, x_shape, inter, rank):
    def make(seed):
        x, weights, adapters = make_case(x_shape, inter, rank, dtype, seed)
        return op(weights), op(to_float64(weights)), [x, *adapters]
    assert_within_dtype_rule(*pooled_results(make, dtype), names=GRAD_NAMES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_with_nf4_weights_within_dtype_rule(dtype):
    """QLoRA: all three base weights NF4 (quantized from bf16). Truth uses the
    dequantized weights."""
    def make(seed):
        x, weights, adapters = make_case(*NF4_SHAPE, dtype, seed)
        nf4 = [to_nf4(w.to(torch.bfloat16), *NF4_BLOCKS) for w in weights]
        return op(nf4), op([w.to(torch.float64) for w in nf4]), [x, *adapters]
    assert_within_dtype_rule(*pooled_results(make, dtype), names=GRAD_NAMES)


@pytest.mark.parametrize("quantized", [False, True])
def test_saves_x_gate_and_up_only(quantized):
    (x_shape, inter, rank) = NF4_SHAPE
    x, weights, adapters = make_case(x_shape, inter, rank, torch.bfloat16)
    if quantized:
        weights = [to_nf4(w, *NF4_BLOCKS) for w in weights]
    x.requires_grad_()
    for a in adapters:
        a.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), \
            force_triton():
        y = op(weights)(x, *adapters)
    n_tokens = x.numel() // x.shape[-1]
    activations = [t for t in saved if t.is_floating_point() and t.dim() == 2 and t.shape[0] == n_tokens]
    # x, and two [N, I] buffers (g and u): not h = silu(g)·u, no rank-r intermediate, not y.
    assert any(t is x for t in saved) and not any(t is y for t in saved)
    assert sorted(tuple(t.shape) for t in activations) == [(n_tokens, inter)] * 2
    if quantized:  # dequantized weights are temporaries
        assert not any(t.is_floating_point() and t.dim() == 2 and t.numel() == inter * x_shape[-1]
                       for t in saved)


def test_gradients_only_where_needed():
    x, weights, adapters = make_case((3, 5, 40), 72, 3, torch.float32)
    gate_a, gate_b, up_a, up_b, down_a, down_b = adapters
    up_b.requires_grad_()
    down_a.requires_grad_()
    with force_triton():
        op(weights)(x, *adapters).sum().backward()
    assert up_b.grad is not None and down_a.grad is not None
    assert x.grad is None and gate_a.grad is None and down_b.grad is None


def test_mismatched_gate_and_up_get_one_line():
    x, weights, adapters = make_case((3, 5, 40), 72, 3, torch.float32)
    weights[1], adapters[3] = weights[1][:-1], adapters[3][:-1]
    with pytest.raises(LoRAKernelError, match="up weight .* != gate weight"):
        op(weights)(x, *adapters)


@pytest.mark.slow
@pytest.mark.parametrize("triton", [False, True])
def test_compiled_matches_eager(triton):
    """fullgraph=True: no graph break, forward and backward equal eager's."""
    x, weights, adapters = make_case((3, 5, 40), 72, 3, torch.float32)
    fn = op(weights)
    eager = run(fn, [x, *adapters], triton)
    compiled = run(torch.compile(fn, fullgraph=True), [x, *adapters], triton)
    for name, c, e in zip(GRAD_NAMES, compiled[0] + compiled[1], eager[0] + eager[1]):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")

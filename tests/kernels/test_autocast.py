"""Every fused op gives the same result inside an autocast region as outside it, on the
reference path and on the forced Triton path (interpreter), in forward and in every
gradient, for autocast to fp16 and to bf16 (the rule: kernels/autocast.py).

The inputs are fp32, the dtype autocast would lower; shapes are tiny (bf16/fp16
matmuls are slow on this CPU). linear_cross_entropy runs with one chunk and with
several: under autocast its dW used to differ between the two."""

import pytest
import torch

from fastune import kernels
from fastune.kernels.dispatch import force_triton

AUTOCAST_DTYPES = [torch.float16, torch.bfloat16]


def _randn(*shape, seed, scale=1.0):
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def cases(n: int = 7):
    """name -> (function of the inputs returning a tensor or tuple, inputs, which inputs train),
    for ``n`` tokens."""
    h, v, inter, r = 16, 23, 24, 4
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(22))
    labels[1::3] = -100
    hidden = _randn(n, h, seed=0)
    rms_w = 1 + _randn(h, seed=1, scale=0.1)
    q, k = _randn(2, 3, 2, 8, seed=2), _randn(2, 3, 1, 8, seed=3)
    angles = _randn(1, 3, 4, seed=4)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    lora = [_randn(inter, h, seed=5, scale=0.2), _randn(r, h, seed=6, scale=0.2), _randn(inter, r, seed=7, scale=0.2)]
    mlp = [_randn(inter, h, seed=8, scale=0.2), _randn(r, h, seed=9, scale=0.2), _randn(inter, r, seed=10, scale=0.2),
           _randn(inter, h, seed=11, scale=0.2), _randn(r, h, seed=12, scale=0.2), _randn(inter, r, seed=13, scale=0.2),
           _randn(h, inter, seed=14, scale=0.2), _randn(r, inter, seed=15, scale=0.2), _randn(h, r, seed=16, scale=0.2)]
    head = _randn(v, h, seed=17, scale=0.3)
    return {
        "linear_cross_entropy_one_chunk": (
            lambda x, w: kernels.linear_cross_entropy(x, w, labels, chunk_size=64)[0], [hidden, head], [0, 1]),
        "linear_cross_entropy_chunks": (
            lambda x, w: kernels.linear_cross_entropy(x, w, labels, chunk_size=3)[0], [hidden, head], [0, 1]),
        "cross_entropy": (
            lambda logits: kernels.cross_entropy(logits.clone(), labels)[0], [_randn(n, v, seed=18)], [0]),
        "rms_norm": (lambda x, w: kernels.rms_norm(x, w), [hidden, rms_w], [0, 1]),
        "add_rms_norm": (lambda x, res, w: kernels.add_rms_norm(x, res, w), [hidden, _randn(n, h, seed=19), rms_w],
                         [0, 1, 2]),
        "swiglu": (lambda g, u: kernels.swiglu(g, u), [_randn(n, inter, seed=20), _randn(n, inter, seed=21)], [0, 1]),
        "geglu": (lambda g, u: kernels.geglu(g, u), [_randn(n, inter, seed=20), _randn(n, inter, seed=21)], [0, 1]),
        "rms_norm_gemma": (lambda x, w: kernels.rms_norm(x, w, weight_offset=1.0, weight_in_fp32=True),
                           [hidden, rms_w], [0, 1]),
        "linear_cross_entropy_softcap": (
            lambda x, w: kernels.linear_cross_entropy(x, w, labels, chunk_size=3, softcap=2.0)[0], [hidden, head],
            [0, 1]),
        "linear_cross_entropy_tokens": (
            lambda x, w: kernels.linear_cross_entropy(x, w, labels, chunk_size=3, reduction="none")[0].sum(),
            [hidden, head], [0, 1]),
        "rope": (lambda q, k: kernels.apply_rope(q, k, cos, sin), [q, k], [0, 1]),
        "lora_linear": (lambda x, w, a, b: kernels.lora_linear(x, w, a, b, 2.0), [hidden, *lora], [0, 2, 3]),
        "lora_mlp": (lambda x, *ws: kernels.lora_mlp(x, *ws, 2.0), [hidden, *mlp], [0, 2, 3, 5, 6, 8, 9]),
    }


CASES = cases()


def _run(fn, inputs, trained, autocast_dtype):
    """Outputs and gradients (of a fixed random projection of the outputs), with forward
    inside autocast to ``autocast_dtype`` (None: no autocast) and backward outside it, as
    PyTorch's autocast documentation prescribes."""
    leaves = [t.clone().requires_grad_(i in trained) for i, t in enumerate(inputs)]
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
    total = sum((o.float() * _randn(*o.shape, seed=99)).sum() for o in outs)
    total.backward()
    return [o.detach() for o in outs] + [leaves[i].grad for i in trained]


@pytest.mark.parametrize("triton", [False, True], ids=["reference", "triton"])
@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_op_ignores_autocast(name, autocast_dtype, triton):
    fn, inputs, trained = CASES[name]
    with force_triton(triton):
        plain = _run(fn, inputs, trained, None)
        under = _run(fn, inputs, trained, autocast_dtype)
    for want, got in zip(plain, under):
        assert got.dtype == want.dtype
        assert torch.equal(got, want), f"{name}: max diff {(got - want).abs().max()}"

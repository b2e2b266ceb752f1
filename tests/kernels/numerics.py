"""Shared numerics for kernel tests: float64 truth, forward+backward runs, error bounds.

How to use it for a new op (see tests/kernels/test_swiglu.py for a short example):

    inputs = make_inputs(dtype)                                   # leaf tensors
    outs, grads = fwd_bwd(op, inputs)                             # kernel or reference
    eager_outs, eager_grads = fwd_bwd(reference, inputs)          # eager, same dtype
    true_outs, true_grads = fwd_bwd(reference, to_float64(inputs), grad_dtype=dtype)
    assert_bf16_close(outs + grads, eager_outs + eager_grads, true_outs + true_grads)

``fwd_bwd`` draws the upstream gradients from a fixed seed and rounds them to
``grad_dtype`` first, so a float64 run sees exactly the values the low-precision
run saw. The bound in ``assert_bf16_close`` is the project's bf16 rule (docs/architecture.md):
a kernel may be at most 2x as far from the float64 truth as eager PyTorch is in the
same dtype, plus 1e-6. It holds for fp32 too, where it is just tighter.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

BF16_FACTOR = 2.0
BF16_SLACK = 1e-6


def as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def to_float64(inputs: Sequence) -> list:
    """Float tensors upcast to float64 (exactly), everything else unchanged."""
    return [t.double() if torch.is_tensor(t) and t.is_floating_point() else t for t in inputs]


def upstream_grads(outputs: Sequence[torch.Tensor], grad_dtype: Optional[torch.dtype] = None,
                   seed: int = 1234, unit: bool = False) -> list[torch.Tensor]:
    """Fixed random dL/d(output) per output (all ones with ``unit``: for ops that form
    their gradient in forward and only scale it in backward, like the cross-entropies),
    rounded to ``grad_dtype`` (default: the output's dtype) and returned in the output's dtype."""
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for out in outputs:
        g = (torch.ones(out.shape) if unit
             else torch.randn(out.shape, generator=gen, dtype=torch.float32))
        grads.append(g.to(grad_dtype or out.dtype).to(device=out.device, dtype=out.dtype))
    return grads


def fwd_bwd(fn: Callable, inputs: Sequence, grad_dtype: Optional[torch.dtype] = None,
            seed: int = 1234, unit: bool = False) -> tuple[tuple, tuple]:
    """Run ``fn(*inputs)`` on fresh leaf copies of the floating-point inputs, then one
    backward with ``upstream_grads``. Returns (outputs, grads of the float inputs),
    both detached, grads in input order (None where an input got no gradient)."""
    leaves = [t.detach().clone().requires_grad_(True)
              if torch.is_tensor(t) and t.is_floating_point() else t for t in inputs]
    outputs = as_tuple(fn(*leaves))
    grads_out = upstream_grads(outputs, grad_dtype, seed, unit)
    float_leaves = [t for t in leaves if torch.is_tensor(t) and t.requires_grad]
    grads = torch.autograd.grad(outputs, float_leaves, grads_out, allow_unused=True)
    return tuple(o.detach() for o in outputs), tuple(None if g is None else g.detach() for g in grads)


def max_abs_err(actual: torch.Tensor, truth: torch.Tensor) -> float:
    return (actual.double() - truth.double()).abs().max().item()


def assert_bf16_close(actual: Sequence, eager: Sequence, truth: Sequence,
                      names: Optional[Sequence[str]] = None,
                      factor: float = BF16_FACTOR, slack: float = BF16_SLACK) -> None:
    """For each tensor: err(actual, truth) <= factor * err(eager, truth) + slack,
    with err the max absolute difference. ``eager`` is the eager PyTorch result in the
    same dtype as ``actual``; ``truth`` is the float64 result of the same math."""
    actual, eager, truth = as_tuple(actual), as_tuple(eager), as_tuple(truth)
    assert len(actual) == len(eager) == len(truth), "actual, eager and truth differ in length"
    names = names or [f"tensor {i}" for i in range(len(actual))]
    for name, a, e, t in zip(names, actual, eager, truth):
        assert a.shape == t.shape, f"{name}: shape {tuple(a.shape)} != {tuple(t.shape)}"
        assert a.dtype == e.dtype, f"{name}: dtype {a.dtype} != eager's {e.dtype}"
        err, eager_err = max_abs_err(a, t), max_abs_err(e, t)
        bound = factor * eager_err + slack
        assert err <= bound, (
            f"{name}: error {err:.3e} vs float64 exceeds {factor} x eager's {eager_err:.3e} "
            f"+ {slack:.0e} = {bound:.3e}"
        )


def assert_close_to_truth(actual: Sequence, truth: Sequence, rtol: float, atol: float,
                          names: Optional[Sequence[str]] = None) -> None:
    """Plain allclose against float64 truth with a stated tolerance, for checks of a
    reference implementation itself (where there is no eager baseline to compare with)."""
    actual, truth = as_tuple(actual), as_tuple(truth)
    names = names or [f"tensor {i}" for i in range(len(actual))]
    for name, a, t in zip(names, actual, truth):
        torch.testing.assert_close(a.double(), t.double(), rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"{name}: {m}")


def assert_max_rel_err(actual: Sequence, truth: Sequence, tol: float,
                       names: Optional[Sequence[str]] = None) -> None:
    """max|actual - truth| <= tol * max|truth| per tensor: a norm-wise bound for
    low-precision results, where element-wise rtol fails on values that cancel to ~0."""
    actual, truth = as_tuple(actual), as_tuple(truth)
    names = names or [f"tensor {i}" for i in range(len(actual))]
    for name, a, t in zip(names, actual, truth):
        err, scale = max_abs_err(a, t), t.double().abs().max().item()
        assert err <= tol * scale, f"{name}: max error {err:.3e} > {tol:.1e} x max|truth| {scale:.3e}"


def assert_within_dtype_rule(actual: Sequence, eager: Sequence, truth: Sequence,
                             names: Optional[Sequence[str]] = None, fp32_tol: float = 1e-6) -> None:
    """The bf16 rule (``assert_bf16_close``) for low-precision results. For fp32 results,
    whose errors are a few ulps that depend on summation order, the max error over a
    small tensor is too noisy to compare with eager's (two correct orders differ by
    up to ~2.7x): there, ``assert_max_rel_err`` with ``fp32_tol`` (~8 ulps of the largest value)."""
    if as_tuple(actual)[0].dtype == torch.float32:
        assert_max_rel_err(actual, truth, fp32_tol, names)
    else:
        assert_bf16_close(actual, eager, truth, names)

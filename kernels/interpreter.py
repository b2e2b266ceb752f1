"""Workarounds for Triton's CPU interpreter (TRITON_INTERPRET=1), used by the kernel tests.

The 3.9 interpreter rounds fp32 -> bf16 toward zero, while GPUs round to nearest
even; its bf16 ``tl.dot`` is wrong outright. Kernels call ``cast`` for every
downcast they store, and check ``INTERPRET`` to upcast dot operands, so that the
interpreter computes what the GPU computes. Both are compile-time constants: on a
GPU the workaround code is never generated.
"""

import os

import triton
import triton.language as tl

INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def cast(x, dtype: tl.constexpr):
    """``x.to(dtype)`` with round-to-nearest-even, also under the interpreter.

    For bf16 there, x is first rounded in fp32 bits: add 0x7FFF plus the lowest kept
    bit (ties go to even), clear the 16 dropped bits; truncation is then exact."""
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def tanh(x):
    """tanh(x) from one exp, stable at both ends (exp(-2|x|) never overflows).

    libdevice's tanh does not run under the interpreter; this one formula runs, and is
    tested, on both. Absolute error a few fp32 ulps of 1."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)

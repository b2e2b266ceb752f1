"""The kernels take fp16 where they take bf16 (cards without bf16 train in fp16): every
fused op on the forced Triton path (interpreter) in fp16 is within the dtype rule of
DESIGN.md against float64 truth (at most 2x the error of the eager fp16 reference, plus
1e-6), in forward and in every gradient. The ops and inputs are test_autocast's, with
61 tokens: with fewer, the largest error of a rank-r gradient is a maximum over too few
sums to compare with eager's (seeds gave ratios from 0.3 to 2.3 at 7 tokens)."""

import pytest
import torch

from fastune.kernels.dispatch import force_triton
from tests.kernels.numerics import assert_bf16_close, fwd_bwd
from tests.kernels.test_autocast import cases

CASES = cases(61)

UNIT_GRAD = ("linear_cross_entropy_one_chunk", "linear_cross_entropy_chunks", "cross_entropy")


@pytest.mark.parametrize("name", list(CASES))
def test_triton_path_in_fp16_within_dtype_rule(name):
    fn, inputs, trained = CASES[name]
    unit = name in UNIT_GRAD

    def run(dtype, triton):
        cast = [t.to(torch.float16).to(dtype) for t in inputs]  # the truth: of the same fp16 inputs
        frozen = [i for i in range(len(cast)) if i not in trained]
        for i in frozen:  # no gradient asked for the frozen inputs (LoRA base weights)
            cast[i] = cast[i].clone()
        with force_triton(triton):
            outs, grads = fwd_bwd(lambda *xs: fn(*[x.detach() if i in frozen else x for i, x in enumerate(xs)]),
                                  cast, grad_dtype=torch.float16, unit=unit)
        return list(outs) + [grads[i] for i in trained]

    actual = run(torch.float16, True)
    eager = run(torch.float16, False)
    truth = run(torch.float64, False)
    assert_bf16_close(actual, eager, truth)

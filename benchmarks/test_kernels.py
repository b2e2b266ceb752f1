"""pytest-benchmark suite of the fused ops, for developers: the same cases, inputs and
steps (forward + backward) as ``fastune bench kernels``, timed by pytest-benchmark in
one process. For the reported numbers (each implementation in its own process, peak
memory, errors against float64) use ``fastune bench kernels``.

    python -m pytest benchmarks/test_kernels.py                       # all ops, all modes
    python -m pytest benchmarks/test_kernels.py -k "swiglu and compiled" --benchmark-compare
"""

import pytest
import torch

from fastune.bench.kernels import CASES, Step, build_case, implementation, modes
from fastune.bench.measure import synchronize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("mode", modes(DEVICE))
@pytest.mark.parametrize("op", list(CASES))
def test_forward_backward(benchmark, op, mode):
    case = build_case(op, torch.bfloat16, DEVICE)
    step = Step(case, implementation(case, mode, DEVICE))
    benchmark.group = op

    def run():
        step()
        synchronize(DEVICE)

    benchmark.pedantic(run, rounds=10, warmup_rounds=3)

"""The roofline report: its accounting of what linear_cross_entropy moves inside matches
the op counts of the loop itself (on meta tensors, the Triton path forced; the
cross-entropy kernel's second read of the row, invisible to op counts, added), and
``fastune bench kernels --roofline`` prints a row per kernel."""

import pytest
import torch
from click.testing import CliRunner

from fastune.bench.counting import OpCounter
from fastune.bench.roofline import lce_internal_bytes
from fastune.cli import main
from fastune.kernels.dispatch import force_triton
from fastune.kernels.linear_cross_entropy import _chunked_forward


@pytest.mark.parametrize("weight_trains", [False, True])
def test_linear_cross_entropy_accounting_matches_its_counted_loop(weight_trains):
    n, h, v, chunk = 64, 32, 1000, 16
    meta = dict(device="meta", dtype=torch.bfloat16)
    hidden, weight = torch.empty(n, h, **meta), torch.empty(v, h, **meta)
    labels = torch.zeros(n, dtype=torch.int64, device="meta")
    with force_triton(), OpCounter() as ops:
        _chunked_forward(hidden, weight, labels, -100, 0.0, 0.0, chunk, True, weight_trains,
                         weight_trains, False)
    counted = sum(r.bytes_read() + r.bytes_written() for r in ops.records)
    counted += n * v * 2  # the kernel's second pass over each row
    counted -= 3 * n * h * 2  # the boundary: hidden read, dh written, and W's first read
    counted -= v * h * 2
    expected = lce_internal_bytes(n, h, v, chunk, 2, weight_trains) - v * h * 2
    print(f"\nlinear_cross_entropy inside: counted {counted} B, accounted {expected} B")
    assert abs(counted - expected) <= 0.01 * expected


def test_roofline_cli_prints_every_kernel():
    result = CliRunner().invoke(main, ["bench", "kernels", "--roofline", "rtx4090"])
    assert result.exit_code == 0, result.output
    for op in ("rms_norm", "apply_rope", "swiglu", "geglu", "lora_linear", "| cross_entropy",
               "linear_cross_entropy (W trained)"):
        assert op in result.output
    assert "1008 GB/s" in result.output

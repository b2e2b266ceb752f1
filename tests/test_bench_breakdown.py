"""fastune.bench.breakdown: the categories of a profiled step, on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastune.bench.breakdown import CATEGORIES, category, gemm_flops, profile_steps


@pytest.mark.parametrize("names, expected", [
    (["aten::mm"], "matmul"),
    (["aten::add_"], "elementwise"),
    (["Optimizer.step#AdamW.step", "aten::_foreach_mul_"], "optimizer"),
    (["fastune::linear_cross_entropy", "aten::mm"], "loss"),  # the fused loss's GEMMs are the loss's
    (["aten::cross_entropy_loss", "aten::log_softmax"], "loss"),
    (["aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu"], "attention"),
    (["aten::linear", "aten::addmm"], "matmul"),
    (["fastune::document_attention", "aten::masked_fill_"], "attention"),  # its masks are attention's
    (["fastune::document_attention_backward", "aten::add_"], "attention"),
])
def test_an_op_belongs_to_the_category_of_what_encloses_it(names, expected):
    assert category(names) == expected


def test_gemm_flops_from_the_input_shapes():
    assert gemm_flops("aten::mm", [[8, 4], [4, 3]]) == 2 * 8 * 4 * 3
    assert gemm_flops("aten::addmm_", [[8, 3], [8, 4], [4, 3], [], []]) == 2 * 8 * 4 * 3
    assert gemm_flops("aten::baddbmm", [[2, 8, 3], [2, 8, 4], [2, 4, 3]]) == 2 * 2 * 8 * 4 * 3
    flash = "aten::_scaled_dot_product_flash_attention_for_cpu"
    assert gemm_flops(flash, [[1, 4, 16, 8], [1, 4, 32, 8], [1, 4, 32, 8]]) == 4 * 4 * 16 * 32 * 8
    assert gemm_flops(flash + "_backward", [[1, 4, 16, 8], [1, 4, 16, 8], [1, 4, 32, 8]]) == 8 * 4 * 16 * 32 * 8
    assert gemm_flops("aten::add", [[8], [8]]) == 0 and gemm_flops("aten::mm", [[8]]) == 0


def test_a_profiled_step_splits_into_categories_that_add_up_to_the_wall_time():
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    w1 = torch.randn(48, 32, requires_grad=True)
    head = torch.randn(100, 48, requires_grad=True)
    labels = torch.randint(0, 100, (64,))
    optimizer = torch.optim.AdamW([w1, head])

    def step():
        h = torch.relu(x @ w1.t())
        q, k, v = (h.view(1, 1, 64, 48),) * 3
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True).view(64, 48)
        F.cross_entropy(h @ head.t(), labels).backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    out = profile_steps(step, steps=2)
    assert set(out["ms"]) == set(CATEGORIES)
    assert all(out["ms"][c] > 0 for c in CATEGORIES), out["ms"]
    assert sum(out["ms"].values()) == pytest.approx(out["wall_ms"], rel=1e-6)
    # GEMMs outside attention and loss: x @ w1ᵀ and h @ headᵀ, forward and the two of each
    # backward (x needs no gradient: no dx for the first), 2 M N K each.
    assert out["flops"]["matmul"] == 2 * 64 * 32 * 48 * 2 + 2 * 64 * 48 * 100 * 3
    assert out["flops"]["attention"] == 12 * 64 * 64 * 48
    assert out["flops"]["optimizer"] == 0

"""Final-logit softcapping (Gemma 2) inside cross_entropy and linear_cross_entropy: the loss
of cap * tanh(logits / cap), and its gradient w.r.t. the uncapped logits, on the reference
and the Triton (interpreter) paths, against float64 math and within the bf16 rule."""

import pytest
import torch
import torch.nn.functional as F

from fastune.kernels.cross_entropy import cross_entropy
from fastune.kernels.dispatch import force_triton
from fastune.kernels.linear_cross_entropy import linear_cross_entropy
from tests.kernels.numerics import assert_close_to_truth, fwd_bwd, to_float64
from tests.kernels.test_cross_entropy import assert_within_bf16_rule, eager_cross_entropy, make_case
from tests.kernels.test_linear_cross_entropy import make_case as make_linear_case

# Logits are 4 * randn: a cap of 5 saturates the largest ones, so the tanh matters.
CAP = 5.0


def capped(logits):
    """HF Gemma 2's formula, in the logits' dtype."""
    return torch.tanh(logits / CAP) * CAP


def eager_ce(labels, label_smoothing=0.0, z_loss=0.0):
    return lambda x: eager_cross_entropy(capped(x), labels, label_smoothing, z_loss)


def ours_ce(labels, label_smoothing=0.0, z_loss=0.0, triton=False):
    def fn(logits):
        with force_triton(triton):
            return cross_entropy(logits.clone(), labels, label_smoothing=label_smoothing,
                                 z_loss=z_loss, softcap=CAP)[0]
    return fn


def eager_lce(labels, label_smoothing=0.0, z_loss=0.0):
    return lambda h, w: eager_cross_entropy(capped(F.linear(h, w)), labels, label_smoothing, z_loss)


def ours_lce(labels, label_smoothing=0.0, z_loss=0.0, chunk_size=None, triton=False):
    def fn(hidden, weight):
        with force_triton(triton):
            return linear_cross_entropy(hidden, weight, labels, z_loss=z_loss,
                                        label_smoothing=label_smoothing, chunk_size=chunk_size,
                                        softcap=CAP)[0]
    return fn


@pytest.mark.parametrize("triton", [False, True])
@pytest.mark.parametrize("label_smoothing,z_loss", [(0.0, 0.0), (0.2, 1e-2)])
def test_cross_entropy_matches_float64(triton, label_smoothing, z_loss):
    logits, labels = make_case((67,), 1003, torch.float32)
    out = fwd_bwd(ours_ce(labels, label_smoothing, z_loss, triton), [logits])
    truth = fwd_bwd(eager_ce(labels, label_smoothing, z_loss), to_float64([logits]),
                    grad_dtype=torch.float32)
    assert_close_to_truth(out[0] + out[1], truth[0] + truth[1], rtol=1e-5, atol=1e-5,
                          names=["loss", "grad logits"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("label_smoothing,z_loss", [(0.0, 0.0), (0.2, 1e-2)])
def test_cross_entropy_within_bf16_rule(dtype, label_smoothing, z_loss):
    logits, labels = make_case((3, 5), 67, dtype)
    eager = fwd_bwd(eager_ce(labels, label_smoothing, z_loss), [logits], unit=True)
    truth = fwd_bwd(eager_ce(labels, label_smoothing, z_loss), to_float64([logits]), unit=True)
    for triton in (False, True):
        out = fwd_bwd(ours_ce(labels, label_smoothing, z_loss, triton), [logits], unit=True)
        assert_within_bf16_rule(out[0] + out[1], eager[0] + eager[1], truth[0] + truth[1],
                                ["grad logits"])


def test_softcap_changes_the_loss():
    """The cap is really applied (a test that passes with the cap ignored proves nothing)."""
    logits, labels = make_case((3, 5), 67, torch.float32)
    for triton in (False, True):
        with force_triton(triton):
            plain = cross_entropy(logits, labels)[0]
            cap = cross_entropy(logits, labels, softcap=CAP)[0]
        assert not torch.allclose(plain, cap, rtol=1e-2)
        torch.testing.assert_close(cap, eager_cross_entropy(capped(logits), labels))


@pytest.mark.parametrize("triton", [False, True])
@pytest.mark.parametrize("chunk_size,label_smoothing,z_loss", [(None, 0.0, 0.0), (16, 0.2, 1e-2)])
def test_linear_cross_entropy_matches_float64(triton, chunk_size, label_smoothing, z_loss):
    hidden, weight, labels = make_linear_case((67,), 37, 1003, torch.float32)
    # Larger logits than make_case's unit scale, so the cap of 5 bites.
    weight = weight * 4
    out = fwd_bwd(ours_lce(labels, label_smoothing, z_loss, chunk_size, triton), [hidden, weight])
    truth = fwd_bwd(eager_lce(labels, label_smoothing, z_loss), to_float64([hidden, weight]),
                    grad_dtype=torch.float32)
    assert_close_to_truth(out[0] + out[1], truth[0] + truth[1], rtol=1e-5, atol=1e-5,
                          names=["loss", "grad hidden", "grad weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_within_bf16_rule(dtype):
    # 256 tokens: the loss sum's error is mostly the bf16 rounding of the logits, common
    # to both; over a few tokens it is too noisy to compare (HF caps in bf16, we in fp32).
    hidden, weight, labels = make_linear_case((8, 32), 37, 67, torch.float32)
    hidden, weight = hidden.to(dtype), (weight * 4).to(dtype)
    eager = fwd_bwd(eager_lce(labels, 0.2, 1e-2), [hidden, weight], unit=True)
    truth = fwd_bwd(eager_lce(labels, 0.2, 1e-2), to_float64([hidden, weight]), unit=True)
    for triton in (False, True):
        out = fwd_bwd(ours_lce(labels, 0.2, 1e-2, chunk_size=100, triton=triton), [hidden, weight],
                      unit=True)
        assert_within_bf16_rule(out[0] + out[1], eager[0] + eager[1], truth[0] + truth[1],
                                ["grad hidden", "grad weight"])

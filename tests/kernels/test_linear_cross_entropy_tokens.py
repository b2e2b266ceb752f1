"""linear_cross_entropy(reduction="none"): per-token losses with a per-token upstream
gradient. Reference vs float64, Triton path (interpreter) vs reference, the bf16 rule,
frozen weight, all-ignored batch, compile."""

import pytest
import torch

from fastune.kernels.dispatch import force_triton
from fastune.kernels.linear_cross_entropy import linear_cross_entropy
from fastune.kernels.linear_cross_entropy_tokens import linear_cross_entropy_tokens_reference
from tests.kernels.numerics import assert_bf16_close, assert_close_to_truth, fwd_bwd, to_float64
from tests.kernels.test_cross_entropy import IGNORE
from tests.kernels.test_linear_cross_entropy import GRAD_NAMES, make_case

SHAPES = [((67,), 37, 1003), ((3, 5), 37, 67)]
VARIANTS = [(None, 0.0, 0.0), (16, 0.2, 1e-2)]


def reference(labels, label_smoothing=0.0, z_loss=0.0, softcap=0.0):
    return lambda h, w: linear_cross_entropy_tokens_reference(h, w, labels, IGNORE, z_loss,
                                                              label_smoothing, softcap)


def ours(labels, label_smoothing=0.0, z_loss=0.0, chunk_size=None, triton=False, softcap=None):
    def fn(hidden, weight):
        with force_triton(triton):
            losses, _ = linear_cross_entropy(hidden, weight, labels, z_loss=z_loss,
                                             label_smoothing=label_smoothing,
                                             chunk_size=chunk_size, reduction="none", softcap=softcap)
        return losses
    return fn


@pytest.mark.parametrize("triton", [False, True])
def test_per_token_softcap_matches_float64(triton):
    """Gemma 2's final-logit softcap inside the per-token op (DPO on Gemma 2); the cap is
    small enough to bend the logits, so a missing cap fails."""
    hidden, weight, labels = make_case((67,), 37, 1003, torch.float32)
    weight = weight * 8  # logits well past the cap
    out = fwd_bwd(ours(labels, chunk_size=16, triton=triton, softcap=2.0), [hidden, weight])
    truth = fwd_bwd(reference(labels, softcap=2.0), to_float64([hidden, weight]), grad_dtype=torch.float32)
    uncapped = reference(labels)(hidden, weight)
    assert not torch.allclose(uncapped, truth[0][0].float(), rtol=1e-2)
    assert_close_to_truth(out[0] + out[1], truth[0] + truth[1], rtol=1e-5, atol=1e-5,
                          names=["losses"] + GRAD_NAMES)


@pytest.mark.parametrize("tokens_shape,hidden_size,vocab", SHAPES)
@pytest.mark.parametrize("chunk_size,label_smoothing,z_loss", VARIANTS)
@pytest.mark.parametrize("triton", [False, True])
def test_per_token_matches_float64(tokens_shape, hidden_size, vocab, chunk_size,
                                   label_smoothing, z_loss, triton):
    """fp32, random per-token upstream gradient; ignored positions are exactly 0."""
    hidden, weight, labels = make_case(tokens_shape, hidden_size, vocab, torch.float32)
    out = fwd_bwd(ours(labels, label_smoothing, z_loss, chunk_size, triton), [hidden, weight])
    truth = fwd_bwd(reference(labels, label_smoothing, z_loss), to_float64([hidden, weight]),
                    grad_dtype=torch.float32)
    assert out[0][0].shape == labels.shape and out[0][0].dtype == torch.float32
    assert (out[0][0][labels == IGNORE] == 0).all()
    assert_close_to_truth(out[0] + out[1], truth[0] + truth[1], rtol=1e-5, atol=1e-5,
                          names=["losses"] + GRAD_NAMES)


@pytest.mark.parametrize("triton", [False, True])
def test_per_token_within_bf16_rule(triton):
    hidden, weight, labels = make_case((3, 5), 37, 67, torch.bfloat16)
    eager = fwd_bwd(reference(labels), [hidden, weight])
    truth = fwd_bwd(reference(labels), to_float64([hidden, weight]), grad_dtype=torch.bfloat16)
    out = fwd_bwd(ours(labels, chunk_size=4, triton=triton), [hidden, weight])
    assert [g.dtype for g in out[1]] == [torch.bfloat16, torch.bfloat16]
    assert_bf16_close(out[0] + out[1], eager[0] + eager[1], truth[0] + truth[1],
                      names=["losses"] + GRAD_NAMES)


def test_sum_of_per_token_equals_summed_op():
    hidden, weight, labels = make_case((67,), 37, 1003, torch.float32)
    summed, count = linear_cross_entropy(hidden, weight, labels, chunk_size=16)
    losses, count_none = linear_cross_entropy(hidden, weight, labels, chunk_size=16,
                                              reduction="none")
    torch.testing.assert_close(losses.sum(), summed)
    assert int(count) == int(count_none)


def test_frozen_weight_and_all_ignored():
    hidden, weight, labels = make_case((3, 5), 37, 67, torch.float32)
    hidden.requires_grad_(True)
    losses, _ = linear_cross_entropy(hidden, weight, labels, reduction="none")
    losses.sum().backward()
    assert weight.grad is None and hidden.grad is not None
    labels = torch.full_like(labels, IGNORE)
    hidden.grad = None
    losses, count = linear_cross_entropy(hidden, weight, labels, reduction="none")
    losses.sum().backward()
    assert int(count) == 0 and (losses == 0).all() and (hidden.grad == 0).all()


def test_bad_reduction_is_one_line():
    hidden, weight, labels = make_case((3,), 8, 11, torch.float32)
    with pytest.raises(ValueError, match="reduction must be"):
        linear_cross_entropy(hidden, weight, labels, reduction="mean")


def test_compile_fullgraph_matches_eager():
    hidden, weight, labels = make_case((3, 5), 37, 67, torch.float32)
    fn = ours(labels, chunk_size=4)
    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(fwd_bwd(compiled, [hidden, weight]), fwd_bwd(fn, [hidden, weight]))

"""cross_entropy: reference vs float64, Triton kernel (interpreter) vs reference, bf16 rule,
ignored and out-of-range targets, compile, bad input.

The kernel has no tl.dot, so bf16 runs under the interpreter as it is."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.distributed._tools.mem_tracker import MemTracker

from fastune.kernels.cross_entropy import cross_entropy
from fastune.kernels.dispatch import force_triton
from tests.kernels.numerics import assert_bf16_close, assert_close_to_truth, fwd_bwd, to_float64

# The module, not the function of the same name that fastune.kernels exports.
ce_module = importlib.import_module("fastune.kernels.cross_entropy")
IGNORE = -100
# (label_smoothing, z_loss): plain, each option alone, both.
OPTIONS = [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.2, 1e-2)]


def eager_cross_entropy(logits, labels, label_smoothing=0.0, z_loss=0.0):
    """The math in plain PyTorch: fp32 for low-precision logits, float64 stays float64."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    loss = F.cross_entropy(x.reshape(-1, x.shape[-1]), labels.reshape(-1), reduction="sum",
                           ignore_index=IGNORE, label_smoothing=label_smoothing)
    supervised = labels.reshape(-1) != IGNORE
    lse = torch.logsumexp(x.reshape(-1, x.shape[-1]), dim=-1)
    return loss + z_loss * (lse.square() * supervised).sum()


def assert_within_bf16_rule(actual, eager, truth, grad_names):
    """The bf16 rule for (loss, *grads). The loss is an fp32 sum of many token losses: its
    last rounding alone is up to half an fp32 ulp of its value, however it is summed, so
    the loss gets one fp32 ulp of the true value as slack instead of 1e-6."""
    loss_ulp = torch.finfo(torch.float32).eps * truth[0].abs().item()
    assert_bf16_close(actual[:1], eager[:1], truth[:1], names=["loss"],
                      slack=max(loss_ulp, 1e-6))
    assert_bf16_close(actual[1:], eager[1:], truth[1:], names=grad_names)


def make_case(shape, vocab, dtype, seed=0):
    """Logits of a trained-ish scale and labels with about a quarter ignored."""
    gen = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(*shape, vocab, generator=gen)).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < 0.25] = IGNORE
    return logits, labels


def ours(labels, label_smoothing=0.0, z_loss=0.0, triton=False):
    """The op as a function of the logits only. The clone keeps the test's leaf intact:
    cross_entropy overwrites the logits it is given with their gradient."""
    def fn(logits):
        with force_triton(triton):
            loss, _ = cross_entropy(logits.clone(), labels, label_smoothing=label_smoothing,
                                    z_loss=z_loss)
        return loss
    return fn


@pytest.mark.parametrize("shape,vocab", [((67,), 1003), ((3, 5), 67), ((64,), 1024)])
@pytest.mark.parametrize("label_smoothing,z_loss", OPTIONS)
def test_reference_matches_float64(shape, vocab, label_smoothing, z_loss):
    logits, labels = make_case(shape, vocab, torch.float32)
    out, grads = fwd_bwd(ours(labels, label_smoothing, z_loss), [logits])
    truth, true_grads = fwd_bwd(lambda x: eager_cross_entropy(x, labels, label_smoothing, z_loss),
                                to_float64([logits]), grad_dtype=torch.float32)
    assert_close_to_truth(out + grads, truth + true_grads, rtol=1e-5, atol=1e-5,
                          names=["loss", "grad logits"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,vocab", [((3, 5), 67), ((67,), 1003), ((64,), 1024)])
@pytest.mark.parametrize("label_smoothing,z_loss", [(0.0, 0.0), (0.2, 1e-2)])
def test_kernel_and_reference_within_bf16_rule(dtype, shape, vocab, label_smoothing, z_loss):
    """Both paths against float64, bounded by eager PyTorch's own error in the same dtype.

    With a unit upstream gradient: the op stores its gradient rounded in forward, and a
    scale other than 1 rounds once more in backward (see the module docstring)."""
    logits, labels = make_case(shape, vocab, dtype)
    eager = fwd_bwd(lambda x: eager_cross_entropy(x, labels, label_smoothing, z_loss), [logits],
                    unit=True)
    truth = fwd_bwd(lambda x: eager_cross_entropy(x, labels, label_smoothing, z_loss),
                    to_float64([logits]), unit=True)
    for triton in (False, True):
        out, grads = fwd_bwd(ours(labels, label_smoothing, z_loss, triton), [logits], unit=True)
        assert grads[0].dtype == dtype
        assert_within_bf16_rule(out + grads, eager[0] + eager[1], truth[0] + truth[1],
                                ["grad logits"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(dtype):
    logits, labels = make_case((3, 5), 67, dtype)
    ref = fwd_bwd(ours(labels, 0.1, 1e-3), [logits])
    kernel = fwd_bwd(ours(labels, 0.1, 1e-3, triton=True), [logits])
    torch.testing.assert_close(kernel, ref)


def test_kernel_online_logsumexp_across_blocks():
    """V = 5003 spans two 4096-wide blocks; the row maxima sit in the second block, far
    above the first, so the running sum must be rescaled when the maximum moves."""
    logits, labels = make_case((5,), 5003, torch.float32)
    logits[:, 4096:] += 60.0
    labels[:2] = torch.tensor([3, 4500])
    ref = fwd_bwd(ours(labels, 0.1, 1e-3), [logits])
    kernel = fwd_bwd(ours(labels, 0.1, 1e-3, triton=True), [logits])
    torch.testing.assert_close(kernel, ref)
    assert torch.isfinite(kernel[0][0])


@pytest.mark.parametrize("triton", [False, True])
def test_all_ignored_gives_zero_not_nan(triton):
    logits, labels = make_case((7,), 67, torch.float32)
    labels.fill_(IGNORE)
    x = logits.clone().requires_grad_(True)
    with force_triton(triton):
        loss, n_tokens = cross_entropy(x.clone(), labels)
    loss.backward()
    assert loss.item() == 0.0 and n_tokens.item() == 0
    assert n_tokens.dtype == torch.int64 and loss.dtype == torch.float32
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("triton", [False, True])
def test_out_of_range_label_makes_loss_nan(triton):
    logits, labels = make_case((7,), 67, torch.float32)
    labels[3] = 67
    with force_triton(triton):
        loss, _ = cross_entropy(logits, labels)
    assert torch.isnan(loss)


@pytest.mark.parametrize("triton", [False, True])
def test_gradient_overwrites_logits_only_when_needed(triton):
    logits, labels = make_case((7,), 67, torch.float32)
    with force_triton(triton):
        frozen = logits.clone()
        cross_entropy(frozen, labels)
        assert torch.equal(frozen, logits), "logits without grad must stay untouched"
        trained = logits.clone().requires_grad_(True)
        consumed = trained * 1.0
        cross_entropy(consumed, labels)
    assert not torch.equal(consumed.detach(), logits), "the buffer should hold the gradient"


@pytest.mark.slow
@pytest.mark.parametrize("triton", [False, True])
def test_compile_fullgraph_matches_eager(triton):
    logits, labels = make_case((3, 5), 67, torch.float32)

    def mean_loss(x):
        loss, n_tokens = cross_entropy(x * 1.0, labels, z_loss=1e-3, label_smoothing=0.1)
        return loss / n_tokens

    with force_triton(triton):
        eager = fwd_bwd(mean_loss, [logits])
        compiled = fwd_bwd(torch.compile(mean_loss, fullgraph=True), [logits])
    torch.testing.assert_close(compiled, eager)


def test_bad_labels_get_one_line_errors():
    logits = torch.randn(4, 5, 11)
    with pytest.raises(ValueError, match=r"labels have shape \(4, 6\).*\(4, 5\)"):
        cross_entropy(logits, torch.zeros(4, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        cross_entropy(logits, torch.zeros(4, 5))


def test_eager_reference_works_in_row_blocks(monkeypatch):
    """Eager, the reference runs on blocks of rows so that its fp32 temporaries stay small;
    the result is the same as in one block."""
    logits, labels = make_case((256,), 1024, torch.bfloat16)
    whole = fwd_bwd(ours(labels, 0.1, 1e-3), [logits])
    monkeypatch.setattr(ce_module, "REFERENCE_BLOCK", 16 * 1024)  # 16 rows per block
    blocked = fwd_bwd(ours(labels, 0.1, 1e-3), [logits])
    torch.testing.assert_close(blocked, whole, rtol=0, atol=0)

    trained = logits.clone().requires_grad_(True)
    tracker = MemTracker()
    with tracker:
        cross_entropy(trained * 1, labels)
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    logits_bytes = logits.numel() * logits.element_size()
    # The bf16 logits (made by `* 1`, then overwritten with the gradient) plus small blocks.
    assert peak < 1.5 * logits_bytes, f"peak {peak} B vs bf16 logits {logits_bytes} B"

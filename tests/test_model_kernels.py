"""The Transformer with kernels applied (``apply_kernels``: rms_norm, add_rms_norm,
apply_rope, swiglu) gives the logits and gradients of the plain-PyTorch model: on the reference path, on the
Triton path under the interpreter, and in bf16 within the project's bf16 rule. Also
the compile test for those four ops (one compiled function, so two compiles in all)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fastune import kernels
from fastune.kernels.dispatch import force_triton
from fastune.models.config import ModelConfig
from fastune.models.transformer import Transformer
from fastune.modules.kernels import apply_kernels
from tests.kernels.numerics import assert_bf16_close, fwd_bwd

BSZ, SEQLEN, VOCAB = 2, 7, 37


# Qwen3: per-head q/k norms (swapped for the fused RMSNorm too) and a window on layer 1.
QWEN3 = dict(model_type="qwen3", qk_norm=True, sliding_window=3, layer_types=("full_attention", "sliding_attention"))


def tiny_config(**changes) -> ModelConfig:
    # GQA (3 q heads, 1 kv head), head_dim 16 != hidden / heads, odd sizes elsewhere.
    return ModelConfig(vocab_size=VOCAB, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
                       num_attention_heads=3, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-5, **changes)


def models(dtype=torch.float32, **changes):
    """(kernels off, kernels on) with the same random weights, norm weights included."""
    torch.manual_seed(0)
    off = Transformer(tiny_config(**changes))
    with torch.no_grad():
        for name, p in off.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
    on = Transformer(tiny_config(**changes))
    on.load_state_dict(off.state_dict())
    apply_kernels(on, "all")
    return off.to(dtype), on.to(dtype)


def batch():
    """Packed rows: row 0 holds two documents (positions restart at 4), row 1 one."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (BSZ, SEQLEN), generator=gen)
    labels = torch.randint(0, VOCAB, (BSZ, SEQLEN), generator=gen)
    document_ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [0] * SEQLEN])
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2], list(range(SEQLEN))])
    return tokens, labels, position_ids, document_ids


def logits_and_grads(model):
    tokens, labels, position_ids, document_ids = batch()
    model.zero_grad(set_to_none=True)
    logits = model(tokens, position_ids=position_ids, document_ids=document_ids)
    F.cross_entropy(logits.float().flatten(0, 1), labels.flatten()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return logits.detach(), grads


@pytest.mark.parametrize("family", [{}, QWEN3], ids=["llama", "qwen3"])
@pytest.mark.parametrize("triton_path", [False, True], ids=["reference", "triton"])
def test_fp32_logits_and_grads_match_kernels_off(triton_path, family):
    off, on = models(**family)
    if family:
        assert type(on.layers[0].self_attn.q_norm).__name__ == "FusedRMSNorm"
    want_logits, want_grads = logits_and_grads(off)
    with force_triton(triton_path):
        got_logits, got_grads = logits_and_grads(on)
    # The reference path computes the same formulas; the Triton path reorders fp32 sums.
    tol = 1e-5 if triton_path else 1e-6
    torch.testing.assert_close(got_logits, want_logits, rtol=tol, atol=tol)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=tol, atol=tol,
                                   msg=lambda m: f"grad of {name}: {m}")


def test_bf16_triton_path_within_bf16_rule():
    """Kernels on (Triton, interpreter) in bf16 are at most 2x as far from the float64
    model as the plain bf16 model is, for logits and every gradient."""
    off, on = models(torch.bfloat16)
    truth_model = copy.deepcopy(off).double()  # the bf16 weights, exactly, in float64
    truth_logits, truth_grads = logits_and_grads(truth_model)
    eager_logits, eager_grads = logits_and_grads(off)
    with force_triton():
        got_logits, got_grads = logits_and_grads(on)
    names = ["logits"] + list(truth_grads)
    assert_bf16_close([got_logits] + [got_grads[n] for n in truth_grads],
                      [eager_logits] + [eager_grads[n] for n in truth_grads],
                      [truth_logits] + [truth_grads[n] for n in truth_grads], names)


def _decoder_ops(x, residual, weight, q, k, cos, sin, gate, up):
    """Each of the four ops once, as a decoder layer uses them."""
    s, normed = kernels.add_rms_norm(x, residual, weight, 1e-5)
    q, k = kernels.apply_rope(q, k, cos, sin)
    return kernels.rms_norm(s * normed, weight, 1e-5), q, k, kernels.swiglu(gate, up)


@pytest.mark.slow
@pytest.mark.parametrize("triton_path", [False, True], ids=["reference", "triton"])
def test_ops_compile_fullgraph_and_match_eager(triton_path):
    """torch.compile(fullgraph=True) traces every op with no graph break (the Triton
    path as opaque custom ops with fake and autograd registrations) and gives eager's
    outputs and gradients."""
    gen = torch.Generator().manual_seed(0)
    angles = torch.randn(1, 5, 5, generator=gen)
    inputs = [torch.randn(3, 5, 67, generator=gen), torch.randn(3, 5, 67, generator=gen),
              1 + 0.3 * torch.randn(67, generator=gen),
              torch.randn(3, 5, 3, 10, generator=gen), torch.randn(3, 5, 1, 10, generator=gen),
              torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin(),
              torch.randn(3, 5, 67, generator=gen), torch.randn(3, 5, 67, generator=gen)]
    with force_triton(triton_path):
        eager = fwd_bwd(_decoder_ops, inputs)
        torch._dynamo.reset()
        compiled = fwd_bwd(torch.compile(_decoder_ops, fullgraph=True), inputs)
    for a, b in zip(compiled[0] + compiled[1], eager[0] + eager[1]):
        if b is None:  # cos/sin: no gradient on the Triton path
            assert a is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

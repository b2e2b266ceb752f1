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


def lora_mlp_model():
    """Kernels on, LoRA on every MLP projection (and q/v), adapters away from their no-op init."""
    from fastune.modules.peft import apply_lora

    torch.manual_seed(0)
    model = Transformer(tiny_config())
    apply_kernels(model, "all")
    apply_lora(model, ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], rank=4, alpha=8.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    return model


def saved_intermediate_tensors(model, monkeypatch, fused: bool) -> int:
    """Distinct storages of [tokens, intermediate] tensors saved for backward, per layer."""
    from fastune.modules import kernels as module_kernels

    if not fused:
        monkeypatch.setattr(module_kernels, "fused_lora_projections", lambda mlp: None)
    tokens, _, position_ids, document_ids = batch()
    inter = tiny_config().intermediate_size
    saved = {}

    def pack(t):
        if t.numel() == BSZ * SEQLEN * inter and t.shape[-1] == inter:
            saved[t.untyped_storage().data_ptr()] = t  # held: addresses stay unique
        return t

    with force_triton(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, position_ids=position_ids, document_ids=document_ids)
    monkeypatch.undo()
    return len(saved) // tiny_config().num_hidden_layers


def test_lora_mlp_saves_two_intermediate_tensors_per_layer(monkeypatch):
    """Item 4 of the GPU-path review: with gate, up and down all LoRA on the lora kernel
    (and swiglu on), the MLP is the fused LoRA MLP op, which saves gate and up; three ops
    in a row (lora_linear, swiglu, lora_linear) also save silu(gate) * up."""
    model = lora_mlp_model()
    unfused = saved_intermediate_tensors(model, monkeypatch, fused=False)
    fused = saved_intermediate_tensors(model, monkeypatch, fused=True)
    print(f"\nsaved [tokens, intermediate] tensors per layer: {unfused} unfused, {fused} fused")
    assert (unfused, fused) == (3, 2)


@pytest.mark.parametrize("triton_path", [False, True], ids=["reference", "triton"])
def test_lora_mlp_matches_the_unfused_path(monkeypatch, triton_path):
    from fastune.modules import kernels as module_kernels

    model = lora_mlp_model()
    mlp = model.layers[0].mlp
    assert module_kernels.fused_lora_projections(mlp) is not None
    x = torch.randn(BSZ, SEQLEN, tiny_config().hidden_size, requires_grad=True)
    trained = [x] + [p for p in mlp.parameters() if p.requires_grad]

    def run():
        with force_triton(triton_path):
            out = mlp(x)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), trained)
        return out.detach(), grads

    fused_out, fused_grads = run()
    monkeypatch.setattr(module_kernels, "fused_lora_projections", lambda mlp: None)
    want_out, want_grads = run()
    torch.testing.assert_close(fused_out, want_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(fused_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lora_mlp_rule():
    """Not fused with an adapter off, DoRA, dropout, a projection without LoRA, or without
    the lora kernel."""
    from fastune.modules.kernels import fused_lora_projections
    from fastune.modules.lora import disable_adapters
    from fastune.modules.peft import apply_lora

    mlp = lora_mlp_model().layers[0].mlp
    assert fused_lora_projections(mlp) is not None
    with disable_adapters(mlp):
        assert fused_lora_projections(mlp) is None
    for change in ({"use_dora": True}, {"dropout": 0.1}, {"fused": False}):
        mlp = lora_mlp_model().layers[0].mlp
        for name, value in change.items():
            setattr(mlp.down_proj, name, value)
        assert fused_lora_projections(mlp) is None, change
    model = Transformer(tiny_config())
    apply_kernels(model, "all")
    apply_lora(model, ["gate_proj", "up_proj"], rank=4, alpha=8.0)
    assert fused_lora_projections(model.layers[0].mlp) is None

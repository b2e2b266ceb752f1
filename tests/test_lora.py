"""LoRA, DoRA and QLoRA layers and the model transforms around them.

Parity with PEFT itself (same weights, same logits and gradients, adapter files)
is in test_peft_interop.py; this file checks fastune on its own.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastune.kernels import lora as kernels_lora
from fastune.kernels.dispatch import force_triton
from fastune.models import ModelConfig, Transformer
from fastune.modules.lora import LoRAError, LoRALinear, NF4Linear, dequantize, merge_weight
from fastune.modules.peft import (
    apply_lora,
    count_parameters,
    init_dora_magnitudes,
    is_lora_key,
    lora_settings,
    merge_lora,
    reset_lora_parameters,
)

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)
# Every decoder projection a multiple of 64 * 256 elements, as NF4 needs.
NF4_TINY = dict(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, head_dim=32)
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**TINY, **overrides}))
    with torch.no_grad():  # norm weights away from 1, so a skipped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    return model.to(dtype)


def tokens(batch: int = 2, seqlen: int = 11, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model: nn.Module, seed: int = 3) -> None:
    """Non-zero B and magnitudes away from the weight norms, so adapters change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if is_lora_key(key):
                noise = torch.randn(p.shape, generator=gen).to(p.dtype)
                p.add_(0.1 * noise if key.endswith("lora_magnitude_vector") else 0.05 * noise)


# ----------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("use_dora", [False, True])
def test_fresh_adapter_is_a_no_op(use_dora):
    model = tiny_model()
    x = tokens()
    with torch.no_grad():
        before = model(x)
        apply_lora(model, ALL_TARGETS, rank=4, alpha=8, use_dora=use_dora)
        after = model(x)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 7 * 2 + 1
    if use_dora:  # m = ‖W‖_row, recomputed in forward: the gain is 1 up to rounding
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(after, before)


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_layer_matches_formula_in_float64(use_dora, bias):
    """Forward and every gradient against the formulas written out in float64."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(13, 7, bias=bias), rank=3, alpha=5.0, use_dora=use_dora).double()
    randomize_adapters(layer)
    x = torch.randn(2, 5, 13, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    W, A, B, s = layer.weight, layer.lora_A.weight, layer.lora_B.weight, layer.scale
    if use_dora:
        m = layer.lora_magnitude_vector
        gain = m / torch.linalg.norm(W + s * B.detach() @ A.detach(), dim=1).detach()
        expected = gain * (x @ W.T + s * (x @ A.T) @ B.T)
    else:
        expected = x @ W.T + s * (x @ A.T) @ B.T
    if bias:
        expected = expected + layer.bias
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=1e-12)
    grad_out = torch.randn_like(y)
    trainable = [p for p in layer.parameters() if p.requires_grad] + [x]
    got = torch.autograd.grad(y, trainable, grad_out)
    want = torch.autograd.grad(expected, trainable, grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_dropout_only_on_the_adapter_path():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8), rank=2, alpha=2.0, dropout=0.5)
    randomize_adapters(layer)
    x = torch.randn(4, 16)
    layer.train()
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    x_dropped = F.dropout(x, 0.5, training=True)
    expected = F.linear(x, layer.weight, layer.bias) + layer.lora_B(layer.lora_A(x_dropped)) * layer.scale
    torch.testing.assert_close(y, expected)
    layer.eval()
    plain = F.linear(x, layer.weight, layer.bias) + layer.lora_B(layer.lora_A(x)) * layer.scale
    torch.testing.assert_close(layer(x), plain)


@pytest.mark.parametrize("forced", [False, True])
@pytest.mark.parametrize("quantized", [False, True])
def test_kernel_path_matches_the_plain_path(monkeypatch, forced, quantized):
    """fused=True (apply_kernels' lora op) routes through fastune.kernels.lora.lora_linear: its reference on
    CPU, its custom ops (and, for NF4, the Triton dequantization under the
    interpreter) when forced. Output and gradients equal the plain path's."""
    calls = []
    op = kernels_lora.lora_linear
    monkeypatch.setattr(kernels_lora, "lora_linear", lambda *args: calls.append(1) or op(*args))
    torch.manual_seed(0)
    dtype = torch.bfloat16 if quantized else torch.float32
    base = nn.Linear(128, 128, bias=not quantized).to(dtype)
    plain = LoRALinear(copy.deepcopy(base), rank=4, alpha=8.0)
    fused = LoRALinear(copy.deepcopy(base), rank=4, alpha=8.0, fused=True)
    randomize_adapters(plain)
    fused.load_state_dict(plain.state_dict())
    if quantized:
        plain.quantize_base()
        fused.quantize_base()
    x = torch.randn(3, 5, 128, dtype=dtype, requires_grad=True)
    with force_triton(forced):
        y = fused(x)
        grads = torch.autograd.grad(y.float().square().sum(), [x, fused.lora_A.weight, fused.lora_B.weight])
    assert len(calls) == 1
    y_ref = plain(x)
    assert len(calls) == 1
    ref_grads = torch.autograd.grad(y_ref.float().square().sum(), [x, plain.lora_A.weight, plain.lora_B.weight])
    tol = dict(atol=2e-2, rtol=2e-2) if quantized else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, y_ref, **tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **tol)


# ----------------------------------------------------------------------------- apply_lora


def test_only_adapters_train_and_counts_are_right():
    model = tiny_model()
    _, total_before = count_parameters(model)
    apply_lora(model, ["q", "v", "down"], rank=4, alpha=8, use_dora=True)  # torchtune names
    expected = 0
    for layer in model.layers:
        for linear in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.mlp.down_proj):
            expected += 4 * (linear.in_features + linear.out_features) + linear.out_features
    trainable, total = count_parameters(model)
    assert (trainable, total) == (expected, total_before + expected)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(is_lora_key(n) for n in names)
    assert all(not p.requires_grad for n, p in model.named_parameters() if not is_lora_key(n))
    settings = lora_settings(model)
    assert settings.targets == ("q_proj", "v_proj", "down_proj")
    assert (settings.rank, settings.alpha, settings.use_dora, settings.scale) == (4, 8, True, 2.0)


def test_tied_model_counts_the_shared_weight_once():
    model = tiny_model(tie_word_embeddings=True)
    model.tie_weights()
    apply_lora(model, ["q_proj"], rank=2, alpha=2)
    trainable, total = count_parameters(model)
    assert trainable == 2 * 2 * (64 + 64)
    assert total == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert model.lm_head.weight is model.embed_tokens.weight


def test_bad_target_names_the_valid_ones():
    with pytest.raises(LoRAError, match=r"unknown LoRA target 'qproj' \(did you mean 'q_proj'\?\); "
                                        r"valid targets: q_proj, k_proj, v_proj, o_proj, gate_proj, "
                                        r"up_proj, down_proj, lm_head"):
        apply_lora(tiny_model(), ["qproj", "v_proj"], rank=4, alpha=8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(targets=[]), "no LoRA targets given"),
        (dict(rank=0), "rank must be a positive integer"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_settings_are_one_clear_error_and_change_nothing(kwargs, message):
    args = dict(targets=["q_proj"], rank=4, alpha=8) | kwargs
    model = tiny_model()
    with pytest.raises(LoRAError, match=message):
        apply_lora(model, **args)
    assert_untouched(model)


def assert_untouched(model: nn.Module) -> None:
    """No layer replaced, nothing frozen (a failed apply_lora leaves the model as it was)."""
    assert not any(isinstance(m, (LoRALinear, NF4Linear)) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_applying_twice_and_tied_lm_head_are_refused():
    model = tiny_model()
    apply_lora(model, ["q_proj"], rank=2, alpha=2)
    with pytest.raises(LoRAError, match="already applied"):
        apply_lora(model, ["v_proj"], rank=2, alpha=2)
    tied = tiny_model(tie_word_embeddings=True)
    with pytest.raises(LoRAError, match="tied embeddings"):
        apply_lora(tied, ["lm_head"], rank=2, alpha=2)


# ----------------------------------------------------------------------------- merge


@pytest.mark.parametrize("use_dora", [False, True])
def test_merged_weights_reproduce_the_adapted_model(use_dora):
    model = tiny_model()
    base_keys = set(model.state_dict())
    apply_lora(model, ALL_TARGETS, rank=4, alpha=16, use_dora=use_dora)
    randomize_adapters(model)
    merged = merge_lora(model)
    assert set(merged) == base_keys
    plain = tiny_model(seed=99)
    plain.load_state_dict(merged)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), atol=1e-5, rtol=1e-5)


def test_merge_weight_formula():
    gen = torch.Generator().manual_seed(0)
    W, A, B = (torch.randn(s, generator=gen, dtype=torch.float64) for s in [(5, 6), (2, 6), (5, 2)])
    m = torch.rand(5, generator=gen, dtype=torch.float64) + 0.5
    torch.testing.assert_close(merge_weight(W, A, B, 0.5), W + 0.5 * B @ A)
    adapted = W + 0.5 * B @ A
    expected = m[:, None] * adapted / adapted.norm(dim=1, keepdim=True)
    torch.testing.assert_close(merge_weight(W, A, B, 0.5, m), expected)


# ----------------------------------------------------------------------------- meta device


@pytest.mark.parametrize("use_dora", [False, True])
def test_meta_device_flow(use_dora):
    """Build on meta, apply LoRA, materialize, load, then initialize the adapters."""
    reference = tiny_model()
    with torch.device("meta"):
        model = Transformer(reference.config)
    apply_lora(model, ["q_proj", "k_proj", "down_proj"], rank=4, alpha=8, use_dora=use_dora)
    model.to_empty(device="cpu")
    model.reset_buffers(torch.device("cpu"))
    model.load_state_dict(reference.state_dict(), strict=False)
    with torch.no_grad():  # to_empty leaves garbage: make sure the init overwrites it
        for name, p in model.named_parameters():
            if is_lora_key(name):
                p.fill_(float("nan"))
    reset_lora_parameters(model)
    init_dora_magnitudes(model)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(m.lora_A.weight.abs().sum() > 0 for m in model.modules() if isinstance(m, LoRALinear))
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- QLoRA


def dequantized_copy(model: nn.Module) -> nn.Module:
    """The same model with every NF4 weight replaced by its dense dequantized value."""
    ref = tiny_model(dtype=torch.bfloat16, **NF4_TINY)
    apply_lora(ref, lora_settings(model).targets, rank=4, alpha=8, use_dora=lora_settings(model).use_dora)
    ref.load_state_dict({k: dequantize(v) for k, v in model.state_dict().items()})
    return ref


@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_matches_dequantized_reference_in_bf16(use_dora):
    model = tiny_model(dtype=torch.bfloat16, **NF4_TINY)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, ["q_proj", "v_proj", "down_proj"], rank=4, alpha=8, use_dora=use_dora, quantize_base=True)
    nf4_modules = [m for m in model.modules() if isinstance(m, NF4Linear)]
    lora_modules = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(nf4_modules) == 2 * 4 and len(lora_modules) == 2 * 3
    assert all(m.quantized and type(m.weight).__name__ == "NF4Tensor" for m in lora_modules)
    assert type(model.lm_head.weight) is nn.Parameter  # un-adapted lm_head stays dense
    # NF4 is lossy but close: 4 bits per weight, absmax-scaled blocks of 64.
    w = dequantize(model.layers[0].mlp.gate_proj.weight).float()
    err = (w - dense["layers.0.mlp.gate_proj.weight"].float()).abs().mean()
    assert err < 0.1 * dense["layers.0.mlp.gate_proj.weight"].float().abs().mean()
    randomize_adapters(model)
    reference = dequantized_copy(model)
    x = tokens()
    logits, ref_logits = model(x), reference(x)
    # torchao's NF4 linear is F.linear on the dequantized weight, in the same dtype:
    # the same products as the dense reference, so the results are identical.
    assert torch.equal(logits, ref_logits)
    logits.float().square().mean().backward()
    ref_logits.float().square().mean().backward()
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert torch.equal(p.grad, ref_params[name].grad), name
    merged = merge_lora(model)
    assert all(type(v) is torch.Tensor and v.dtype == torch.bfloat16 for v in merged.values())


def test_qlora_dora_magnitudes_come_from_dequantized_weights():
    model = tiny_model(dtype=torch.bfloat16, **NF4_TINY)
    apply_lora(model, ["k_proj"], rank=2, alpha=4, use_dora=True, quantize_base=True)
    layer = model.layers[1].self_attn.k_proj
    expected = torch.linalg.norm(dequantize(layer.weight), dim=1)
    torch.testing.assert_close(layer.lora_magnitude_vector, expected, atol=0, rtol=0)


def test_qlora_weight_shape_error_names_the_weight_and_changes_nothing():
    model = tiny_model()
    with pytest.raises(LoRAError, match=r"QLoRA: layers\.0\.self_attn\.q_proj\.weight \(64, 64\) has 4096 "
                                        r"elements; NF4 needs a multiple of 16384"):
        apply_lora(model, ["q_proj"], rank=2, alpha=4, quantize_base=True)
    assert_untouched(model)


# ----------------------------------------------------------------------------- compile


@pytest.mark.slow
def test_compiled_layers_match_eager():
    """LoRA, DoRA and the kernel path trace with no graph break and match eager."""
    torch.manual_seed(0)
    layers = [
        LoRALinear(nn.Linear(16, 12, bias=True), rank=4, alpha=8.0),
        LoRALinear(nn.Linear(12, 8), rank=4, alpha=8.0, use_dora=True),
        LoRALinear(nn.Linear(8, 6), rank=2, alpha=4.0, fused=True),
    ]
    for layer in layers:
        randomize_adapters(layer)
    trainable = [p for layer in layers for p in layer.parameters() if p.requires_grad]

    def f(x):
        for layer in layers:
            x = layer(x)
        return x

    x = torch.randn(3, 5, 16)
    eager = f(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), trainable)
    compiled = torch.compile(f, fullgraph=True)(x)
    grads = torch.autograd.grad(compiled.square().sum(), trainable)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_disable_adapters_gives_the_base_model(method):
    """Under ``disable_adapters`` the adapted model's logits equal the base model's (its
    NF4 base for QLoRA), bit for bit; afterwards the adapters are on again."""
    from fastune.modules.lora import disable_adapters
    from fastune.modules.peft import quantize_base_weights

    base = tiny_model(**NF4_TINY)
    adapted = copy.deepcopy(base)
    apply_lora(adapted, ["q_proj", "v_proj", "down_proj"], rank=4, alpha=8.0,
               use_dora=method == "dora", quantize_base=method == "qlora")
    if method == "qlora":
        quantize_base_weights(base)  # the same NF4 weights, without adapters
    randomize_adapters(adapted)
    x = tokens()
    with torch.no_grad():
        expected, adapted_logits = base(x), adapted(x)
        assert not torch.equal(adapted_logits, expected)  # the adapters do change the output
        with disable_adapters(adapted):
            assert torch.equal(adapted(x), expected)
        assert torch.equal(adapted(x), adapted_logits)
    with pytest.raises(RuntimeError), disable_adapters(adapted):
        raise RuntimeError("back on even after an error")
    assert all(m.adapter_enabled for m in adapted.modules() if isinstance(m, LoRALinear))

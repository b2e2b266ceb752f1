"""Gemma 3 (text) against transformers beyond the shared parity tests (tiny_hf's
"gemma3" variant runs in test_model_parity, test_attention and test_peft_interop):
the 4.x config.json dialect, the round trip, and kernels left plain where their
numerics differ."""

from __future__ import annotations

import json

import torch
from tiny_hf import build_hf_model, hf_logits, random_tokens, save_hf_model

import fastune
from fastune.models.spec import KERNEL_OPS
from fastune.modules.kernels import apply_kernels

FP32_ATOL = 1e-5


def test_gemma3_transformers_4x_config_dialect(tmp_path):
    """4.x: rope_theta (global), rope_local_base_freq, rope_scaling for the global layers,
    sliding_window_pattern instead of layer_types; transformers reads the same file."""
    from transformers import AutoModelForCausalLM

    hf = build_hf_model("gemma3")
    path = save_hf_model(hf, tmp_path / "ckpt")
    cfg = json.loads((path / "config.json").read_text())
    for key in ("rope_parameters", "layer_types", "dtype"):
        cfg.pop(key, None)
    cfg.update(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 4.0},
               sliding_window_pattern=2, torch_dtype="float32")
    (path / "config.json").write_text(json.dumps(cfg))
    model = fastune.from_pretrained(path)
    assert model.config.layer_types == ("sliding_attention", "full_attention")
    theirs = AutoModelForCausalLM.from_pretrained(path).eval()
    tokens = random_tokens(2, 45)
    assert (model(tokens) - hf_logits(theirs, tokens)).abs().max() <= FP32_ATOL
    assert (hf_logits(theirs, tokens) - hf_logits(hf, tokens)).abs().max() <= FP32_ATOL


def test_gemma3_round_trip_through_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = build_hf_model("gemma3")
    model = fastune.from_pretrained(save_hf_model(hf, tmp_path / "src"))
    assert model.lm_head.weight is model.embed_tokens.weight
    fastune.save_pretrained(model, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(reloaded).__name__ == "Gemma3ForCausalLM"
    assert reloaded.config.layer_types == hf.config.layer_types
    tokens = random_tokens(2, 33)
    assert torch.equal(hf_logits(reloaded, tokens), hf_logits(hf, tokens))


def test_gemma3_kernels_keep_gemma_numerics(tmp_path):
    """Every op applies to Gemma: the norm kernel computes its (1 + w) fp32 numerics and
    the swiglu op swaps in the GeGLU kernel; the logits stay HF's."""
    hf = build_hf_model("gemma3")
    model = fastune.from_pretrained(save_hf_model(hf, tmp_path / "src"))
    assert apply_kernels(model, "all") == KERNEL_OPS
    assert type(model.layers[0].post_feedforward_layernorm).__name__ == "FusedRMSNorm"
    assert type(model.layers[0].mlp).__name__ == "FusedGeGLUMLP"
    tokens = random_tokens(2, 30)
    with torch.no_grad():
        assert (model(tokens) - hf_logits(hf, tokens)).abs().max() <= FP32_ATOL

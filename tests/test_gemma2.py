"""Gemma 2 against transformers beyond the shared tests (tiny_hf's "gemma2" variant runs
in test_model_parity, test_attention and test_peft_interop; its LoRA training curve in
test_train_parity): the 4.x config.json dialect with transformers' own defaults, the
round trip, both softcaps really acting, the fused loss, and kernels left on."""

from __future__ import annotations

import dataclasses
import json

import torch
import torch.nn.functional as F
from tiny_hf import build_hf_model, hf_logits, random_tokens, save_hf_model

import fastune
from fastune.models.config import ModelConfig
from fastune.models.spec import KERNEL_OPS
from fastune.modules.kernels import apply_kernels
from fastune.training.loss import build_loss

FP32_ATOL = 1e-5


def max_abs(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def test_gemma2_transformers_4x_config_dialect(tmp_path):
    """4.x: top-level rope_theta, no layer_types (Gemma 2 alternates sliding, full);
    transformers reads the same file to the same logits."""
    from transformers import AutoModelForCausalLM

    hf = build_hf_model("gemma2")
    path = save_hf_model(hf, tmp_path / "ckpt")
    cfg = json.loads((path / "config.json").read_text())
    for key in ("rope_parameters", "layer_types", "dtype"):
        cfg.pop(key, None)
    cfg.update(rope_theta=10000.0, hidden_act="gelu_pytorch_tanh", torch_dtype="float32",
               num_hidden_layers=2, cache_implementation="hybrid")
    (path / "config.json").write_text(json.dumps(cfg))
    model = fastune.from_pretrained(path)
    assert model.config.layer_types == ("sliding_attention", "full_attention")
    assert (model.config.attn_logit_softcapping, model.config.final_logit_softcapping) == (4.0, 3.0)
    theirs = AutoModelForCausalLM.from_pretrained(path).eval()
    tokens = random_tokens(2, 45)
    assert max_abs(model(tokens), hf_logits(theirs, tokens)) <= FP32_ATOL
    assert max_abs(hf_logits(theirs, tokens), hf_logits(hf, tokens)) <= FP32_ATOL


def test_gemma2_keys_left_out_take_gemma2_defaults():
    """A config.json without the softcap, window and RoPE keys means Gemma2Config's defaults
    (softcaps 50 and 30, window 4096, theta 10k), not Gemma 3's (none, 1M)."""
    from transformers import Gemma2Config

    shape = dict(model_type="gemma2", vocab_size=96, hidden_size=64, intermediate_size=80,
                 num_hidden_layers=4, num_attention_heads=4)
    ours, theirs = ModelConfig.from_hf_dict(shape), Gemma2Config(**shape)
    assert ours.attn_logit_softcapping == theirs.attn_logit_softcapping == 50.0
    assert ours.final_logit_softcapping == theirs.final_logit_softcapping == 30.0
    assert ours.sliding_window == theirs.sliding_window == 4096
    assert list(ours.layer_types) == theirs.layer_types
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"] and not ours.layer_rope
    assert not ours.qk_norm and ours.query_pre_attn_scalar == theirs.query_pre_attn_scalar


def test_gemma2_round_trip_through_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = build_hf_model("gemma2")
    model = fastune.from_pretrained(save_hf_model(hf, tmp_path / "src"))
    assert model.lm_head.weight is model.embed_tokens.weight
    assert not hasattr(model.layers[0].self_attn, "q_norm")
    fastune.save_pretrained(model, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(reloaded).__name__ == "Gemma2ForCausalLM"
    for key in ("layer_types", "sliding_window", "attn_logit_softcapping", "final_logit_softcapping",
                "query_pre_attn_scalar", "rope_parameters"):
        assert getattr(reloaded.config, key) == getattr(hf.config, key), key
    tokens = random_tokens(2, 33)
    assert torch.equal(hf_logits(reloaded, tokens), hf_logits(hf, tokens))


def test_both_softcaps_act_on_the_tiny_model(tmp_path):
    """Negative control for the parity tests: without either cap the logits move far
    beyond the tolerance, so the tiny variant does test both."""
    hf = build_hf_model("gemma2")
    path = save_hf_model(hf, tmp_path / "src")
    tokens = random_tokens(2, 45)
    theirs = hf_logits(hf, tokens)
    model = fastune.from_pretrained(path)
    assert max_abs(model(tokens), theirs) <= FP32_ATOL
    model.config.final_logit_softcapping = None
    assert max_abs(model(tokens), theirs) > 1e-2
    model = fastune.from_pretrained(path)
    for layer in model.layers:
        layer.self_attn.layer = dataclasses.replace(layer.self_attn.layer, softcap=None)
    assert max_abs(model(tokens), theirs) > 1e-2


def test_gemma2_kernels_on_equal_transformers_and_the_fused_loss_caps(tmp_path):
    """Every op applies (Gemma's norm, GeGLU, the fused loss with the final softcap inside):
    the logits stay HF's, and the fused loss equals cross-entropy of HF's capped logits."""
    hf = build_hf_model("gemma2")
    model = fastune.from_pretrained(save_hf_model(hf, tmp_path / "src"))
    assert apply_kernels(model, "all") == KERNEL_OPS
    assert type(model.layers[1].mlp).__name__ == "FusedGeGLUMLP"
    tokens, labels = random_tokens(2, 30), random_tokens(2, 30, seed=4)
    labels[0, :7] = -100
    theirs = hf_logits(hf, tokens)
    loss_fn = build_loss(model, {"chunk_size": None, "z_loss": 0.0, "label_smoothing": 0.0})
    n = int((labels != -100).sum())
    with torch.no_grad():
        assert max_abs(model(tokens), theirs) <= FP32_ATOL
        hidden = model(tokens, return_hidden=True)
        ours, count = loss_fn(hidden, labels, num_supervised=n)
        uncapped = F.cross_entropy(F.linear(hidden, model.lm_head.weight).flatten(0, 1), labels.flatten(),
                                   ignore_index=-100, reduction="sum")
    reference = F.cross_entropy(theirs.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    assert int(count) == n
    assert abs(float(ours) - float(reference)) / n <= FP32_ATOL
    # and the cap is what makes them equal: the uncapped loss is another number
    assert abs(float(uncapped) - float(reference)) / n > 1e-2

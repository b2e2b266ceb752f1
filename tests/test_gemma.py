"""Gemma 3 against transformers beyond the shared parity tests (tiny_hf's "gemma3"
variant runs in test_model_parity, test_attention and test_peft_interop): the 4.x
config.json dialect, the round trip, the kernels, and the language model of a
multimodal checkpoint (Gemma3ForConditionalGeneration) in both key layouts."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from tiny_hf import build_hf_model, hf_logits, random_tokens, save_hf_model

import fastune
from fastune.models.config import ModelConfig
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


def tiny_multimodal(seed: int = 0):
    """A random Gemma3ForConditionalGeneration: tiny_hf's "gemma3" language model and a
    one-layer SigLIP tower, weights drawn as tiny_hf draws them."""
    import transformers

    text = build_hf_model("gemma3").config.to_dict()
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision.to_dict(), mm_tokens_per_image=4,
                                       image_token_index=95, boi_token_index=93, eoi_token_index=94)
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.2) if "norm" in name else p.normal_(0.0, 0.1)
    return model.eval()


def as_module_names(path):
    """Rewrite the checkpoint with transformers 5's module names (model.language_model.*,
    model.vision_tower.*, lm_head.*); save_pretrained writes 4.x's keys (language_model.model.*,
    vision_tower.*), which gemma-3-4b-it on the Hub has too."""
    from safetensors.torch import load_file, save_file

    renames = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
               ("", "model."))
    tensors = load_file(path / "model.safetensors")
    out = {}
    for key, tensor in tensors.items():
        old, new = next(r for r in renames if key.startswith(r[0]))
        out[new + key[len(old):]] = tensor
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    return set(out)


@pytest.mark.parametrize("layout", ["saved", "module_names"])
def test_multimodal_gemma3_loads_its_language_model(tmp_path, caplog, layout):
    """fastune loads the language model of a Gemma3ForConditionalGeneration checkpoint,
    says in one line that the vision tower is ignored, equals HF's logits for text-only
    input, and saves a text-only Gemma3ForCausalLM that transformers loads to the same logits."""
    from transformers import AutoModelForCausalLM

    hf = tiny_multimodal()
    path = save_hf_model(hf, tmp_path / "src")
    if layout == "module_names":
        keys = as_module_names(path)
        assert any(k.startswith("model.language_model.layers.") for k in keys)
        assert any(k.startswith("model.vision_tower.") for k in keys)
    with caplog.at_level(logging.INFO, logger="fastune.checkpoint.hf"):
        model = fastune.from_pretrained(path)
    notes = [r.getMessage() for r in caplog.records if "vision tower" in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0] and "language model only" in notes[0]
    assert model.config.model_type == "gemma3_text" and model.config.layer_types == ("sliding_attention",
                                                                                     "full_attention")
    tokens = random_tokens(2, 45, vocab=93)  # text only: below the image and boundary tokens
    theirs = hf_logits(hf, tokens)
    with torch.no_grad():
        assert (model(tokens) - theirs).abs().max() <= FP32_ATOL
    fastune.save_pretrained(model, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["architectures"] == ["Gemma3ForCausalLM"] and "vision_config" not in saved
    text_only = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(text_only).__name__ == "Gemma3ForCausalLM"
    assert (hf_logits(text_only, tokens) - theirs).abs().max() <= FP32_ATOL


def test_multimodal_text_config_takes_gemma3_text_defaults():
    """gemma-3-4b-it's text_config names only what differs from Gemma3TextConfig; the rest
    (heads, head_dim, vocabulary, RoPE bases, pattern) are that class's defaults."""
    from transformers import Gemma3Config

    hub = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
           "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                           "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                           "sliding_window": 1024},
           "vision_config": {"model_type": "siglip_vision_model"}}
    ours, theirs = ModelConfig.from_hf_dict(hub), Gemma3Config(**hub).text_config
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "sliding_window", "query_pre_attn_scalar", "max_position_embeddings"):
        assert getattr(ours, key) == getattr(theirs, key), key
    assert list(ours.layer_types) == theirs.layer_types
    assert ours.rope_theta == theirs.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert ours.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert ours.layer_rope["sliding_attention"]["rope_theta"] == theirs.rope_parameters["sliding_attention"][
        "rope_theta"] == 1e4
    assert ours.tie_word_embeddings and "vision_config" not in ours.extra

"""Tiny random Hugging Face checkpoints, written by ``transformers`` itself, for
the parity and checkpoint tests.

Weights are re-drawn at a scale that makes logits O(1) and norm weights differ
from 1, so that a wrong key mapping, norm or rotation changes the logits far
beyond the tolerances (HF's own init, std 0.02, gives near-zero logits that
would hide such bugs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

BASE = dict(
    vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5,
    max_position_embeddings=2048, tie_word_embeddings=False,
)
LLAMA3_SCALING = {
    # original_max_position_embeddings=32 puts the head's wavelengths in all
    # three bands (kept, smoothed, divided) for head_dim 16.
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
}

# name -> (architecture, config overrides)
VARIANTS = {
    "llama_mha": ("llama", {}),
    "llama_gqa_llama3": ("llama", dict(num_key_value_heads=2, rope_theta=500000.0,
                                       rope_scaling=LLAMA3_SCALING)),
    "llama_tied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2_bias": ("qwen2", dict(num_key_value_heads=2, rope_theta=1000000.0)),
    "mistral": ("mistral", dict(num_key_value_heads=2)),
    "llama_head_dim": ("llama", dict(num_key_value_heads=2, head_dim=32)),
    "llama_linear_rope": ("llama", dict(rope_theta=50000.0,
                                        rope_scaling={"rope_type": "linear", "factor": 4.0})),
    # Windows shorter than the test sequences (45 tokens).
    "mistral_window": ("mistral", dict(num_key_value_heads=2, sliding_window=16)),
    # Qwen2 slides on layers >= max_window_layers.
    "qwen2_window": ("qwen2", dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=16,
                                   max_window_layers=1)),
    "qwen3": ("qwen3", dict(num_key_value_heads=2, head_dim=32, rope_theta=1000000.0,
                            use_sliding_window=True, sliding_window=12,
                            layer_types=["sliding_attention", "full_attention"])),
    "qwen3_tied": ("qwen3", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    # Gemma 3: local layer (window 12, RoPE base 10k) then global (1M, linear x4), head_dim 32
    # scaled by query_pre_attn_scalar 24, tied.
    "gemma3": ("gemma3", dict(num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24, sliding_window=12,
                              tie_word_embeddings=True, layer_types=["sliding_attention", "full_attention"],
                              rope_parameters={
                                  "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    # Gemma 2: Gemma 2's own layer pattern (sliding, full), window 12, both softcaps low enough
    # to bite on these logits, head_dim 32 scaled by query_pre_attn_scalar 24, tied.
    "gemma2": ("gemma2", dict(num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24, sliding_window=12,
                              tie_word_embeddings=True, attn_logit_softcapping=4.0, final_logit_softcapping=3.0,
                              rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
}

# original_max_position_embeddings=32 with beta_fast=8 puts the ramp inside head_dim 16.
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 8.0, "beta_slow": 1.0}
# DeepSeek-style attention factor from mscale / mscale_all_dim.
YARN_MSCALE = {**YARN, "factor": 8.0, "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False}


def longrope(rotary_dim: int) -> dict:
    """LongRoPE with distinct short and long factors, switching past 32 positions."""
    n = rotary_dim // 2
    return {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(n)],
            "long_factor": [2.0 + 0.5 * i for i in range(n)]}


PHI = dict(num_key_value_heads=2, max_position_embeddings=256, original_max_position_embeddings=32,
           sliding_window=None, pad_token_id=None, bos_token_id=None, eos_token_id=None)
# RoPE scaling and the Phi family (tests/test_phi3.py), kept out of VARIANTS.
ROPE_VARIANTS = {
    "llama_yarn": ("llama", dict(num_key_value_heads=2, max_position_embeddings=128, rope_scaling=YARN)),
    "qwen2_yarn_mscale": ("qwen2", dict(num_key_value_heads=2, max_position_embeddings=256,
                                        rope_theta=1000000.0, rope_scaling=YARN_MSCALE)),
    "phi3": ("phi3", dict(PHI)),
    "phi3_longrope": ("phi3", dict(PHI, num_key_value_heads=4, rope_scaling=longrope(16))),
    # Phi-4-mini: partial rotary (12 of 16 dims), LongRoPE, tied head.
    "phi4_mini": ("phi3", dict(PHI, partial_rotary_factor=0.75, tie_word_embeddings=True,
                               rope_scaling=longrope(12))),
}


def build_hf_model(variant: str, seed: int = 0, **config):
    """A random ``*ForCausalLM`` in fp32, eval mode; ``config`` overrides the variant's keys."""
    import transformers

    arch, overrides = {**VARIANTS, **ROPE_VARIANTS}[variant]
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
    }[arch]
    config = config_cls(**{**BASE, **overrides, **config})
    return random_hf_model(model_cls, config, seed, norm_std=0.2, std=0.1).eval()


def random_hf_model(model_class, config, seed: int = 0, norm_mean: float = 1.0, norm_std: float = 0.1,
                    std: float = 0.08):
    """``model_class(config)`` with norms drawn from N(``norm_mean``, ``norm_std``) and every
    other weight from N(0, ``std``): O(1) logits that a few steps of training move visibly."""
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(norm_mean, norm_std) if "norm" in name else p.normal_(0.0, std)
    return model


def save_hf_model(model, out_dir: Path, max_shard_size: Optional[str] = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    return out_dir


def hf_logits(model, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens, position_ids=position_ids).logits


def random_tokens(batch: int, seqlen: int, vocab: int = BASE["vocab_size"], seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seqlen), generator=torch.Generator().manual_seed(seed))

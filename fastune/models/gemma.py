"""The Gemma 3 family (text model, ``gemma3_text`` / ``Gemma3ForCausalLM``).

What differs from the shared decoder, checked against transformers 5:
- RMSNorm ``(1 + w) * xhat`` in fp32 (``GEMMA_NUMERICS``), also on q and k per head;
- a GELU-tanh gated MLP;
- four norms per layer: pre and post attention, pre and post feed-forward;
- embeddings scaled by sqrt(hidden), the scale cast to the model dtype first;
- attention scores scaled by ``query_pre_attn_scalar ** -0.5``;
- sliding (local) and full (global) layers, ``layer_types`` or every
  ``sliding_window_pattern``-th layer global; local layers with their own RoPE base
  (``rope_local_base_freq``, 10k), global ones with ``rope_theta`` (1M) and its scaling.

Both config.json dialects: 5.x (``rope_parameters`` per layer type) and 4.x
(``rope_theta``, ``rope_local_base_freq``, ``rope_scaling``). The multimodal
``gemma3`` checkpoints and Gemma 2's final-logit softcap are not read yet.
The modules are in ``fastune.models.gemma_layers``; this module imports no torch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fastune.errors import ConfigError
from fastune.models.config import ModelConfig, normalize_rope_scaling
from fastune.models.families import (
    ATTENTION, FULL, MLP, OUTPUT, SLIDING, TORCHTUNE_ALIASES, _REQUIRED, decoder_model_flops,
)
from fastune.models.spec import ModelSpec, Numerics, register

GEMMA_NUMERICS = Numerics(norm_weight_offset=1.0, norm_weight_in_fp32=True, activation="gelu_pytorch_tanh")
# Keys read into ModelConfig fields, or replaced by what gemma3_hf_config writes.
_READ = {"rope_parameters", "rope_local_base_freq", "sliding_window_pattern", "hidden_activation", "hidden_act",
         "final_logit_softcapping", "use_bidirectional_attention", "sliding_window", "layer_types"}


def parse_gemma3_config(d: dict[str, Any], source: str) -> ModelConfig:
    for key in _REQUIRED:
        if key not in d:
            raise ConfigError(f"{source}: missing required key {key!r}")
    for key in ("final_logit_softcapping", "use_bidirectional_attention"):
        if d.get(key):
            raise ConfigError(f"{source}: {key} is not supported for gemma3_text yet")
    activation = d.get("hidden_activation") or d.get("hidden_act") or GEMMA_NUMERICS.activation
    if activation != GEMMA_NUMERICS.activation:
        raise ConfigError(f"{source}: hidden_activation {activation!r}; gemma3_text uses gelu_pytorch_tanh")
    rope = d.get("rope_parameters") or {}
    if FULL in rope or SLIDING in rope:  # 5.x: one RoPE per layer type
        full, local = dict(rope.get(FULL) or {}), dict(rope.get(SLIDING) or {})
        global_theta, local_theta = full.get("rope_theta", 1e6), local.get("rope_theta", 1e4)
    else:  # 4.x: the scaling is the global layers'
        full, local = dict(d.get("rope_scaling") or {}), {}
        global_theta, local_theta = d.get("rope_theta", 1e6), d.get("rope_local_base_freq", 1e4)
    layers = d["num_hidden_layers"]
    pattern = d.get("sliding_window_pattern", 6)
    types = d.get("layer_types") or [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
    known = {f.name for f in dataclasses.fields(ModelConfig)} | _READ
    return ModelConfig(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=layers,
        num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        head_dim=d.get("head_dim") or 256,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(global_theta),
        rope_scaling=normalize_rope_scaling(full, source),
        max_position_embeddings=d.get("max_position_embeddings", 131072),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        attention_bias=bool(d.get("attention_bias", False)),
        qk_norm=True,
        sliding_window=d.get("sliding_window", 4096),
        layer_types=tuple(types),
        attn_logit_softcapping=d.get("attn_logit_softcapping"),
        query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256),
        layer_rope={SLIDING: {"rope_theta": float(local_theta),
                              "rope_scaling": normalize_rope_scaling(local, source)}},
        model_type=d.get("model_type", "gemma3_text"),
        extra={k: v for k, v in d.items() if k not in known},
    )


def gemma3_hf_config(config: ModelConfig) -> dict[str, Any]:
    """config.json in the 4.x dialect, which transformers 5 reads too."""
    local = config.layer_rope.get(SLIDING, {})
    if local.get("rope_scaling"):
        raise ConfigError("gemma3_text: RoPE scaling on the local layers cannot be written to config.json")
    d = dict(config.extra)
    d.update(
        architectures=["Gemma3ForCausalLM"], model_type=config.model_type, vocab_size=config.vocab_size,
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta, rope_scaling=config.rope_scaling,
        rope_local_base_freq=local.get("rope_theta", config.rope_theta),
        max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=config.attention_bias, sliding_window=config.sliding_window,
        layer_types=list(config.layer_types), attn_logit_softcapping=config.attn_logit_softcapping,
        final_logit_softcapping=None, query_pre_attn_scalar=config.query_pre_attn_scalar,
        hidden_activation=GEMMA_NUMERICS.activation,
    )
    return d


def build_gemma3(config: ModelConfig):
    from fastune.models.gemma_layers import Gemma3Transformer

    return Gemma3Transformer(config)


GEMMA3 = register(ModelSpec(
    model_type="gemma3_text",
    architecture="Gemma3ForCausalLM",
    parse_config=parse_gemma3_config,
    to_hf_config=gemma3_hf_config,
    build=build_gemma3,
    model_flops=decoder_model_flops,
    lora_groups={"attention": ATTENTION, "mlp": MLP, "output": OUTPUT},
    lora_aliases=TORCHTUNE_ALIASES,
    numerics=GEMMA_NUMERICS,
))

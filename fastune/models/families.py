"""The built-in model families: Llama, Mistral, Qwen2 and Qwen3, on one shared decoder
(``fastune.models.transformer``). A family that reuses the decoder is one
``decoder_spec(...)`` call below; one with other modules or fused checkpoint
tensors passes its own ``build`` or ``adapter`` to ``ModelSpec``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Optional

from fastune.models.config import ModelConfig, normalize_rope_scaling
from fastune.models.spec import ModelSpec, register

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
OUTPUT = ("lm_head",)
# torchtune's names for the same layers (its "output_proj" is attention's o_proj,
# its "output" the final projection).
TORCHTUNE_ALIASES = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "output_proj": "o_proj",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj", "output": "lm_head",
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


Windows = Callable[[dict[str, Any], int], tuple[Optional[int], Optional[tuple[str, ...]]]]
SLIDING, FULL = "sliding_attention", "full_attention"


def mistral_windows(d: dict[str, Any], layers: int):
    """Mistral (transformers 5): ``sliding_window`` set means every layer slides."""
    window = d.get("sliding_window")
    return (window, (SLIDING,) * layers) if window else (None, None)


def qwen_windows(d: dict[str, Any], layers: int):
    """Qwen2/Qwen3 (transformers 5): a window only with ``use_sliding_window``; the layers
    are ``layer_types`` if given, else those from ``max_window_layers`` on (default 28)."""
    window = d.get("sliding_window", 4096) if d.get("use_sliding_window", False) else None
    if window is None:
        return None, None
    types = d.get("layer_types") or [SLIDING if i >= d.get("max_window_layers", 28) else FULL
                                     for i in range(layers)]
    return window, tuple(types)


def parse_decoder_config(d: dict[str, Any], source: str, attention_bias: bool = False, qk_norm: bool = False,
                         windows: Optional[Windows] = None) -> ModelConfig:
    """A Llama-style config.json in either dialect (4.x top-level rope_theta and
    rope_scaling with "type" or "rope_type"; 5.x rope_parameters).
    ``attention_bias``: the family's default for q/k/v biases; ``qk_norm``: whether it
    norms q and k per head; ``windows``: its reading of the sliding-window keys (None:
    the family has none). The raw window keys stay in ``extra``, written back as read."""
    from fastune.errors import ConfigError

    for key in _REQUIRED:
        if key not in d:
            raise ConfigError(f"{source}: missing required key {key!r}")
    heads = d["num_attention_heads"]
    rope_params = d.get("rope_parameters") or {}
    rope_theta = rope_params.get("rope_theta", d.get("rope_theta", 10000.0))
    raw_scaling = d.get("rope_scaling") or rope_params or None
    max_positions = d.get("max_position_embeddings", 2048)
    scaling = normalize_rope_scaling(raw_scaling, source, d.get("original_max_position_embeddings"), max_positions)
    # The rope dict's own value wins over the top-level one (transformers 5's setdefault).
    partial = (raw_scaling or {}).get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    known = {f.name for f in dataclasses.fields(ModelConfig)} | {"rope_parameters"}
    known -= {"sliding_window", "layer_types"}
    window, layer_types = windows(d, d["num_hidden_layers"]) if windows else (None, None)
    return ModelConfig(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=scaling,
        partial_rotary_factor=float(partial),
        max_position_embeddings=max_positions,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bool(d.get("attention_bias", attention_bias)),
        qk_norm=qk_norm,
        sliding_window=window,
        layer_types=layer_types,
        model_type=d.get("model_type", "llama"),
        final_logit_softcapping=d.get("final_logit_softcapping"),
        extra={k: v for k, v in d.items() if k not in known},
    )


def decoder_hf_config(config: ModelConfig, architecture: str, activation: str,
                      write_attention_bias: bool = True, write_sliding_window: bool = False) -> dict[str, Any]:
    """config.json in the transformers 4.x dialect (read by 4.x and 5.x).
    ``write_sliding_window``: the family's config class has the key (its default
    may not be None, so it is written even when None)."""
    d = dict(config.extra)
    d.update(
        architectures=[architecture],
        model_type=config.model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        rope_scaling=config.rope_scaling,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        hidden_act=activation,
    )
    if config.final_logit_softcapping is not None:
        d["final_logit_softcapping"] = config.final_logit_softcapping
    if write_attention_bias:
        d["attention_bias"] = config.attention_bias
    if config.sliding_window is not None:
        d["sliding_window"] = config.sliding_window
    elif write_sliding_window:  # the config class's default may not be None
        d.setdefault("sliding_window", None)
    if config.partial_rotary_factor != 1.0:
        d["partial_rotary_factor"] = config.partial_rotary_factor
    return d


def build_decoder(config: ModelConfig):
    from fastune.models.transformer import Transformer

    return Transformer(config)


def decoder_projection_shapes(c: ModelConfig) -> dict[str, tuple[int, int]]:
    """(fan_in, fan_out) of each linear layer inside a decoder layer."""
    q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return {"q_proj": (c.hidden_size, q_out), "k_proj": (c.hidden_size, kv_out),
            "v_proj": (c.hidden_size, kv_out), "o_proj": (q_out, c.hidden_size),
            "gate_proj": (c.hidden_size, c.intermediate_size), "up_proj": (c.hidden_size, c.intermediate_size),
            "down_proj": (c.intermediate_size, c.hidden_size)}


def decoder_model_flops(c: ModelConfig, rows: int, seq: int, micro_batches: int = 1, *,
                        full: bool, lora_targets: Iterable[str] = (), lora_rank: int = 0) -> float:
    """Model FLOPs of ``micro_batches`` batches of [rows, seq] tokens, counting what the
    math needs, not what the implementation does: every matmul costs 2 FLOPs per
    multiply-add; a frozen weight costs its forward and its input gradient (2 matmuls),
    a trained one also its weight gradient (3); attention scores and values cost
    2 * 2 * P * H * D per row and layer in forward, with P the (query, key) pairs a
    layer attends to (causal: S^2/2; a window W < S: S*W - W^2/2), twice that in
    backward. Recomputation by activation checkpointing is not counted.
    Padding positions count: the model computes them. ``full``: every weight trains;
    else LoRA of ``lora_rank`` on ``lora_targets``."""
    tokens = rows * seq * micro_batches
    targets = set() if full else set(lora_targets)
    frozen = trained = 0
    for name, (fan_in, fan_out) in decoder_projection_shapes(c).items():
        weight = fan_in * fan_out * c.num_hidden_layers
        trained += weight if full else 0
        frozen += 0 if full else weight
        if name in targets:
            trained += lora_rank * (fan_in + fan_out) * c.num_hidden_layers
    head = c.hidden_size * c.vocab_size
    head_trained = full and not c.tie_word_embeddings or "lm_head" in targets
    trained += head if head_trained else 0
    frozen += 0 if head_trained else head
    if "lm_head" in targets:
        trained += lora_rank * (c.hidden_size + c.vocab_size)
    matmuls = tokens * (2 * 2 * frozen + 2 * 3 * trained)
    q_out = c.num_attention_heads * c.head_dim
    pairs = 0.0
    for i in range(c.num_hidden_layers):
        window = c.layer_attention(i).sliding_window
        pairs += seq * window - window * window / 2 if window and window < seq else seq * seq / 2
    attention_forward = 2 * 2 * pairs * q_out * rows * micro_batches
    return matmuls + 3 * attention_forward


def decoder_spec(model_type: str, architecture: str, attention_bias: bool = False,
                 write_attention_bias: bool = True, write_sliding_window: bool = False, qk_norm: bool = False,
                 windows: Optional[Windows] = None) -> ModelSpec:
    """A family on the shared Llama-style decoder."""
    return ModelSpec(
        model_type=model_type,
        architecture=architecture,
        parse_config=lambda d, source: parse_decoder_config(d, source, attention_bias, qk_norm, windows),
        to_hf_config=lambda c: decoder_hf_config(c, architecture, "silu", write_attention_bias,
                                                 write_sliding_window),
        build=build_decoder,
        model_flops=decoder_model_flops,
        lora_groups={"attention": ATTENTION, "mlp": MLP, "output": OUTPUT},
        lora_aliases=TORCHTUNE_ALIASES,
    )


LLAMA = register(decoder_spec("llama", "LlamaForCausalLM"))
# Mistral's and Qwen2's config classes have a sliding_window key with a non-None default.
MISTRAL = register(decoder_spec("mistral", "MistralForCausalLM", write_sliding_window=True,
                                windows=mistral_windows))
# Qwen2 has q/k/v biases, and its config class has no attention_bias key.
QWEN2 = register(decoder_spec("qwen2", "Qwen2ForCausalLM", attention_bias=True, write_attention_bias=False,
                              write_sliding_window=True, windows=qwen_windows))
# Qwen3: no q/k/v biases, q_norm and k_norm per head before RoPE; small sizes tie embeddings.
QWEN3 = register(decoder_spec("qwen3", "Qwen3ForCausalLM", qk_norm=True, write_sliding_window=True,
                              windows=qwen_windows))

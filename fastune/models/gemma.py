"""The Gemma 2 and Gemma 3 families: ``gemma2`` (``Gemma2ForCausalLM``), ``gemma3_text``
(``Gemma3ForCausalLM``), and the language model of multimodal ``gemma3`` checkpoints
(``Gemma3ForConditionalGeneration``).

What both differ in from the shared decoder, checked against transformers 5:
- RMSNorm ``(1 + w) * xhat`` in fp32 (``GEMMA_NUMERICS``);
- a GELU-tanh gated MLP (GeGLU);
- four norms per layer: pre and post attention, pre and post feed-forward;
- embeddings scaled by sqrt(hidden), the scale cast to the model dtype first;
- attention scores scaled by ``query_pre_attn_scalar ** -0.5``;
- sliding (local) and full (global) layers: ``layer_types``, or every
  ``sliding_window_pattern``-th layer global (Gemma 2: every second, from layer 1;
  Gemma 3: every sixth).

Gemma 2: attention-logit softcapping (50) and final-logit softcapping (30, applied by
``Transformer.logits`` and inside the fused losses), one RoPE for every layer.
Gemma 3: q and k normed per head; local layers with their own RoPE base
(``rope_local_base_freq``, 10k), global ones with ``rope_theta`` (1M) and its scaling.

Both config.json dialects: 5.x (``rope_parameters``, per layer type for Gemma 3) and
4.x (``rope_theta``, ``rope_local_base_freq``, ``rope_scaling``); keys a config.json
leaves out take the transformers config class's defaults, which differ by family.
A multimodal ``gemma3`` checkpoint gives its ``text_config`` and the language model's
weights (``language_model.model.*``, as the Hub's files and transformers' save_pretrained
have them, or ``model.language_model.*``, transformers 5's module names); the vision
tower and the projector are skipped, and the loader says so. Such a model is saved as a
text-only ``Gemma3ForCausalLM``.
The modules are in ``fastune.models.gemma_layers``; this module imports no torch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from fastune.errors import ConfigError
from fastune.models.config import ModelConfig, normalize_rope_scaling
from fastune.models.families import (
    ATTENTION, FULL, MLP, OUTPUT, SLIDING, TORCHTUNE_ALIASES, _REQUIRED, decoder_model_flops,
)
from fastune.models.spec import ModelSpec, Numerics, StateDictAdapter, register

GEMMA_NUMERICS = Numerics(norm_weight_offset=1.0, norm_weight_in_fp32=True, activation="gelu_pytorch_tanh")
# Keys read into ModelConfig fields, or replaced by what gemma_hf_config writes.
_READ = {"rope_parameters", "rope_local_base_freq", "sliding_window_pattern", "hidden_activation", "hidden_act",
         "use_bidirectional_attention", "sliding_window", "layer_types"}


@dataclasses.dataclass(frozen=True)
class GemmaDialect:
    """What one Gemma generation's config class says. ``defaults``: its values for keys a
    config.json may leave out; ``local_rope``: sliding layers have their own RoPE base."""

    model_type: str
    architecture: str
    qk_norm: bool
    local_rope: bool
    defaults: dict[str, Any]


GEMMA2_DIALECT = GemmaDialect("gemma2", "Gemma2ForCausalLM", qk_norm=False, local_rope=False, defaults=dict(
    rope_theta=1e4, max_position_embeddings=8192, sliding_window=4096, sliding_window_pattern=2,
    attn_logit_softcapping=50.0, final_logit_softcapping=30.0))
GEMMA3_DIALECT = GemmaDialect("gemma3_text", "Gemma3ForCausalLM", qk_norm=True, local_rope=True, defaults=dict(
    rope_theta=1e6, rope_local_base_freq=1e4, max_position_embeddings=131072, sliding_window=4096,
    sliding_window_pattern=6, attn_logit_softcapping=None, final_logit_softcapping=None))
# Gemma3TextConfig's shape defaults: a multimodal checkpoint's text_config often leaves them out.
GEMMA3_TEXT_SHAPE = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=256)


def _rope(d: dict[str, Any], dialect: GemmaDialect, source: str) -> tuple[float, Optional[dict], dict]:
    """(global rope_theta, its scaling, layer_rope) from either dialect."""
    rope, defaults = d.get("rope_parameters") or {}, dialect.defaults
    local: Optional[dict] = None
    if FULL in rope or SLIDING in rope:  # 5.x, Gemma 3: one RoPE per layer type
        full, local = dict(rope.get(FULL) or {}), dict(rope.get(SLIDING) or {})
        theta = full.get("rope_theta", defaults["rope_theta"])
    elif rope:  # 5.x, Gemma 2: one RoPE
        full, theta = dict(rope), rope.get("rope_theta", d.get("rope_theta", defaults["rope_theta"]))
    else:  # 4.x: the scaling is the global layers'
        full, theta = dict(d.get("rope_scaling") or {}), d.get("rope_theta", defaults["rope_theta"])
    if dialect.local_rope:
        local = local if local is not None else {}
        local.setdefault("rope_theta", d.get("rope_local_base_freq", defaults["rope_local_base_freq"]))
    layer_rope = {} if local is None else {
        SLIDING: {"rope_theta": float(local["rope_theta"]), "rope_scaling": normalize_rope_scaling(local, source)}}
    return float(theta), normalize_rope_scaling(full, source), layer_rope


def parse_gemma_config(d: dict[str, Any], source: str, dialect: GemmaDialect) -> ModelConfig:
    for key in _REQUIRED:
        if key not in d:
            raise ConfigError(f"{source}: missing required key {key!r}")
    name = dialect.model_type
    if d.get("use_bidirectional_attention"):
        raise ConfigError(f"{source}: use_bidirectional_attention is not supported for {name}")
    if d.get("attention_bias"):  # Gemma's o_proj would have a bias too, which the decoder has not
        raise ConfigError(f"{source}: attention_bias is not supported for {name}")
    activation = d.get("hidden_activation") or d.get("hidden_act") or GEMMA_NUMERICS.activation
    if activation != GEMMA_NUMERICS.activation:
        raise ConfigError(f"{source}: hidden_activation {activation!r}; {name} uses gelu_pytorch_tanh")
    defaults = dialect.defaults
    rope_theta, rope_scaling, layer_rope = _rope(d, dialect, source)
    layers = d["num_hidden_layers"]
    pattern = d.get("sliding_window_pattern", defaults["sliding_window_pattern"])
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
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=d.get("max_position_embeddings", defaults["max_position_embeddings"]),
        final_logit_softcapping=d.get("final_logit_softcapping", defaults["final_logit_softcapping"]),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        qk_norm=dialect.qk_norm,
        sliding_window=d.get("sliding_window", defaults["sliding_window"]),
        layer_types=tuple(types),
        attn_logit_softcapping=d.get("attn_logit_softcapping", defaults["attn_logit_softcapping"]),
        query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256),
        layer_rope=layer_rope,
        model_type=name,
        extra={k: v for k, v in d.items() if k not in known},
    )


def gemma_hf_config(config: ModelConfig, dialect: GemmaDialect) -> dict[str, Any]:
    """config.json in the 4.x dialect, which transformers 5 reads too. Both softcaps are
    written, None included: Gemma 2's config class defaults them to 50 and 30."""
    local = config.layer_rope.get(SLIDING)
    if local and (local.get("rope_scaling") or not dialect.local_rope):
        raise ConfigError(f"{dialect.model_type}: this local-layer RoPE cannot be written to config.json")
    d = dict(config.extra)
    d.update(
        architectures=[dialect.architecture], model_type=dialect.model_type, vocab_size=config.vocab_size,
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta, rope_scaling=config.rope_scaling,
        max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=False, sliding_window=config.sliding_window, layer_types=list(config.layer_types),
        attn_logit_softcapping=config.attn_logit_softcapping,
        final_logit_softcapping=config.final_logit_softcapping,
        query_pre_attn_scalar=config.query_pre_attn_scalar, hidden_activation=GEMMA_NUMERICS.activation,
    )
    if dialect.local_rope:
        d["rope_local_base_freq"] = (local or {}).get("rope_theta", config.rope_theta)
    return d


def parse_gemma3_multimodal_config(d: dict[str, Any], source: str) -> ModelConfig:
    """The language model of a ``Gemma3ForConditionalGeneration`` config.json: its
    ``text_config`` over Gemma3TextConfig's defaults, as a ``gemma3_text`` config (the
    tie is the top level's, as transformers 5 reads it). The multimodal keys are dropped,
    so the model saves as a text-only checkpoint."""
    text = d.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError(f"{source}: model_type 'gemma3' without a text_config")
    text = {**GEMMA3_TEXT_SHAPE, **text, "model_type": GEMMA3_DIALECT.model_type,
            "tie_word_embeddings": d.get("tie_word_embeddings", text.get("tie_word_embeddings", True))}
    return parse_gemma_config(text, f"{source} (text_config)", GEMMA3_DIALECT)


def build_gemma(config: ModelConfig):
    from fastune.models.gemma_layers import GemmaTransformer

    return GemmaTransformer(config)


def gemma_spec(dialect: GemmaDialect, adapter: StateDictAdapter = StateDictAdapter()) -> ModelSpec:
    return ModelSpec(
        model_type=dialect.model_type,
        architecture=dialect.architecture,
        parse_config=lambda d, source: parse_gemma_config(d, source, dialect),
        to_hf_config=lambda c: gemma_hf_config(c, dialect),
        build=build_gemma,
        model_flops=decoder_model_flops,
        lora_groups={"attention": ATTENTION, "mlp": MLP, "output": OUTPUT},
        lora_aliases=TORCHTUNE_ALIASES,
        adapter=adapter,
        numerics=GEMMA_NUMERICS,
    )


GEMMA2 = register(gemma_spec(GEMMA2_DIALECT))
# The text family's adapter also reads the language model out of a multimodal checkpoint
# (under transformers 5's module names, or as saved) and skips everything else it holds.
GEMMA3 = register(gemma_spec(GEMMA3_DIALECT, StateDictAdapter(
    renames=(("model.language_model.", "model."), ("language_model.model.", "model."),
             ("language_model.lm_head.", "lm_head.")),
    ignored=("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.", "multi_modal_projector."),
)))
# A multimodal checkpoint parses to a gemma3_text config, so GEMMA3 builds, loads and saves it.
GEMMA3_MULTIMODAL = register(dataclasses.replace(
    GEMMA3, model_type="gemma3", architecture="Gemma3ForConditionalGeneration",
    parse_config=parse_gemma3_multimodal_config))

"""What llama.cpp expects of each model family: tensor names, RoPE, norms and the
architecture's own metadata (``FAMILIES``), for ``fastune.export.gguf``.

Conventions follow llama.cpp's ``convert_hf_to_gguf.py`` and were checked by running
the files in llama.cpp (tests/test_export_gguf_llamacpp.py):

- Qwen3: per-head ``attn_q_norm``/``attn_k_norm``, half-split (NEOX) rotation as Qwen2.
- Phi-3: ``qkv_proj`` and ``gate_up_proj`` stay fused (llama.cpp splits them by rows);
  partial rotary is the rope dimension count; LongRoPE is two factor tensors, the
  original context and the attention factor. llama.cpp takes the long factors when its
  context (n_ctx, which it rounds up to 256) exceeds the original context, where fastune
  and transformers look at the sequence. llama.cpp reads the sliding window and then
  disables Phi-3's sliding attention. It special-cases a model whose general.name holds
  "phi3" or "phi-3" by looking up Phi-3's own tokens (``</s>``, ...), so such a name
  needs the Phi-3 tokenizer.
- Gemma 2 / 3: RMSNorm ``(1 + w)`` is stored as ``1 + w``; the post-attention and
  post-FFN norms have their own names; softcapping, sliding window and (Gemma 3) the
  local layers' RoPE base are metadata. llama.cpp fixes which layers slide (Gemma 2 every
  other one from layer 0, Gemma 3 five of six) and ignores ``query_pre_attn_scalar``, so
  a different layer pattern is refused and the scale ratio is folded into Q. It scales
  the embeddings by sqrt(hidden) itself.
- YaRN: type, factor, original context and betas; llama.cpp derives the attention factor
  (1 + 0.1 ln factor) itself and rounds the ramp's ends, so other YaRN variants are refused.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import gguf
import numpy as np

T = gguf.MODEL_TENSOR

# Hugging Face key -> GGUF tensor; "{bid}" is the layer index. The suffix (.weight/.bias) is kept.
LLAMA_TENSORS = {
    "model.embed_tokens": T.TOKEN_EMBD,
    "model.norm": T.OUTPUT_NORM,
    "lm_head": T.OUTPUT,
    "model.layers.{bid}.input_layernorm": T.ATTN_NORM,
    "model.layers.{bid}.self_attn.q_proj": T.ATTN_Q,
    "model.layers.{bid}.self_attn.k_proj": T.ATTN_K,
    "model.layers.{bid}.self_attn.v_proj": T.ATTN_V,
    "model.layers.{bid}.self_attn.o_proj": T.ATTN_OUT,
    "model.layers.{bid}.post_attention_layernorm": T.FFN_NORM,
    "model.layers.{bid}.mlp.gate_proj": T.FFN_GATE,
    "model.layers.{bid}.mlp.up_proj": T.FFN_UP,
    "model.layers.{bid}.mlp.down_proj": T.FFN_DOWN,
}


_LAYER = "model.layers.{bid}."
QWEN3_TENSORS = {**LLAMA_TENSORS, _LAYER + "self_attn.q_norm": T.ATTN_Q_NORM, _LAYER + "self_attn.k_norm": T.ATTN_K_NORM}
# Phi-3 keeps the checkpoint's fused projections: llama.cpp splits qkv by rows and gate_up in halves.
PHI3_TENSORS = {**{k: v for k, v in LLAMA_TENSORS.items() if v not in (T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.FFN_GATE)},
                _LAYER + "self_attn.qkv_proj": T.ATTN_QKV, _LAYER + "mlp.gate_up_proj": T.FFN_UP}
# Gemma's post_attention_layernorm norms the attention output; the pre-FFN norm has its own name.
GEMMA_TENSORS = {**QWEN3_TENSORS, _LAYER + "post_attention_layernorm": T.ATTN_POST_NORM,
                 _LAYER + "pre_feedforward_layernorm": T.FFN_PRE_NORM,
                 _LAYER + "post_feedforward_layernorm": T.FFN_POST_NORM}


def _no_hparams(writer: gguf.GGUFWriter, config) -> None:
    pass


@dataclasses.dataclass(frozen=True)
class GGUFFamily:
    """What llama.cpp expects of one HF ``model_type``."""

    arch: gguf.MODEL_ARCH
    tensors: dict  # HF key prefix -> gguf.MODEL_TENSOR
    # Reorder Q/K rows from the half-split rotation to the adjacent-pairs one (llama.cpp's NORM rope).
    permute_qk: bool = False
    # The RoPE scaling types llama.cpp's graph for this architecture applies as fastune does.
    rope_types: tuple[str, ...] = ("default", "linear")
    # Added to every norm weight: Gemma's RMSNorm multiplies by (1 + w), llama.cpp's by the stored w.
    norm_offset: float = 0.0
    # llama.cpp's own choice of sliding layers (layer index -> slides), None where its graph never slides.
    sliding: Optional[Callable[[int], bool]] = None
    hparams: Callable[[gguf.GGUFWriter, object], None] = _no_hparams  # the architecture's own metadata
    # Multiplies Q (its per-head norm where there is one) so that llama.cpp's attention scale gives fastune's scores.
    query_scale: Callable[[object], float] = lambda config: 1.0


def _phi3_hparams(writer: gguf.GGUFWriter, config) -> None:
    from fastune.models.rope import rope_attention_scaling

    original = (config.rope_scaling or {}).get("original_max_position_embeddings",
                                               config.extra.get("original_max_position_embeddings"))
    if original:
        writer.add_rope_scaling_orig_ctx_len(int(original))
    writer.add_sliding_window(config.sliding_window or 0)  # llama.cpp reads it, and then disables Phi-3 SWA
    if config.rope_scaling and config.rope_scaling["rope_type"] == "longrope":
        writer.add_rope_scaling_attn_factors(rope_attention_scaling(config))


def _gemma_query_scale(config) -> float:
    """llama.cpp ignores query_pre_attn_scalar: it scales Gemma's scores by 1/sqrt(head_dim),
    or 1/sqrt(hidden / heads) for the 27B models it recognizes by their layer count. The
    ratio to the checkpoint's scale is folded into Q (1 for Google's models)."""
    big = config.num_hidden_layers == {"gemma2": 46, "gemma3_text": 62}[config.model_type]
    theirs = config.hidden_size // config.num_attention_heads if big else config.head_dim
    return (theirs / config.query_pre_attn_scalar) ** 0.5


def _gemma_hparams(writer: gguf.GGUFWriter, config) -> None:
    writer.add_sliding_window(config.sliding_window)
    if config.attn_logit_softcapping:
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if config.final_logit_softcapping:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    local = config.layer_rope.get("sliding_attention")
    if local:
        writer.add_rope_freq_base_swa(local["rope_theta"])


LLAMA_ROPE = ("default", "linear", "llama3", "yarn")
# One entry per HF model_type fastune supports; a new family is one line here.
FAMILIES = {
    "llama": GGUFFamily(gguf.MODEL_ARCH.LLAMA, LLAMA_TENSORS, permute_qk=True, rope_types=LLAMA_ROPE),
    "mistral": GGUFFamily(gguf.MODEL_ARCH.LLAMA, LLAMA_TENSORS, permute_qk=True, rope_types=LLAMA_ROPE),
    "qwen2": GGUFFamily(gguf.MODEL_ARCH.QWEN2, LLAMA_TENSORS, rope_types=("default", "linear", "yarn")),
    "qwen3": GGUFFamily(gguf.MODEL_ARCH.QWEN3, QWEN3_TENSORS, rope_types=("default", "linear", "yarn")),
    "phi3": GGUFFamily(gguf.MODEL_ARCH.PHI3, PHI3_TENSORS, rope_types=("default", "longrope"), hparams=_phi3_hparams),
    "gemma2": GGUFFamily(gguf.MODEL_ARCH.GEMMA2, GEMMA_TENSORS, norm_offset=1.0, sliding=lambda i: i % 2 == 0,
                         hparams=_gemma_hparams, query_scale=_gemma_query_scale),
    "gemma3_text": GGUFFamily(gguf.MODEL_ARCH.GEMMA3, GEMMA_TENSORS, norm_offset=1.0, sliding=lambda i: i % 6 < 5,
                              hparams=_gemma_hparams, query_scale=_gemma_query_scale),
}


def yarn_as_llama_cpp(config) -> bool:
    """llama.cpp rounds the ramp's ends to whole dims (transformers' truncate) and scales
    cos and sin by 1 + 0.1 ln factor, whatever the file says (checked with llama.cpp)."""
    from fastune.models.rope import context_factor, rope_attention_scaling

    default = 1 + 0.1 * math.log(context_factor(config, config.rope_scaling))
    return config.rope_scaling.get("truncate", True) and abs(rope_attention_scaling(config) - default) < 1e-6


def sliding_layers(config) -> list[bool]:
    return [t == "sliding_attention" for t in config.layer_types or ["full_attention"] * config.num_hidden_layers]


def rope_tensors(config) -> dict[gguf.MODEL_TENSOR, np.ndarray]:
    """Per-frequency divisors llama.cpp reads from tensors.
    Llama 3.1: ``rope_freqs``, the ratio of fastune's unscaled to scaled inverse frequencies.
    LongRoPE: both factor lists; llama.cpp takes the long ones when its context (n_ctx)
    exceeds the original one, fastune and transformers when the sequence does."""
    from fastune.models.rope import rope_inv_freq

    kind = config.rope_scaling["rope_type"] if config.rope_scaling else "default"
    if kind == "llama3":
        base = rope_inv_freq(dataclasses.replace(config, rope_scaling=None))
        return {T.ROPE_FREQS: (base / rope_inv_freq(config)).numpy().astype(np.float32)}
    if kind == "longrope":
        return {T.ROPE_FACTORS_LONG: np.array(config.rope_scaling["long_factor"], dtype=np.float32),
                T.ROPE_FACTORS_SHORT: np.array(config.rope_scaling["short_factor"], dtype=np.float32)}
    return {}


def add_rope_scaling(writer: gguf.GGUFWriter, config) -> None:
    """Linear: the factor. YaRN: the factor, the original context and the ramp's betas
    (llama.cpp derives the attention factor, 1 + 0.1 ln factor, itself)."""
    from fastune.models.rope import context_factor

    scaling = config.rope_scaling or {"rope_type": "default"}
    if scaling["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif scaling["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(context_factor(config, scaling)))
        writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
        writer.add_rope_scaling_yarn_beta_fast(float(scaling.get("beta_fast") or 32))
        writer.add_rope_scaling_yarn_beta_slow(float(scaling.get("beta_slow") or 1))

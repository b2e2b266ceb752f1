"""The shared Llama-style decoder (Llama 2/3/3.1/3.2, Mistral, Qwen2, Qwen3, TinyLlama, SmolLM).

Module and parameter names follow Hugging Face's ``LlamaModel``; the family's
``StateDictAdapter`` (``fastune.models.spec``) maps checkpoint keys. Everything is
plain ``nn.Module`` code that ``torch.compile`` traces without graph breaks.

Each formula is written once, as the reference function of ``fastune.kernels``
(RMSNorm, RoPE, SwiGLU); this file calls those and knows nothing of fused kernels.
``fastune.modules.kernels.apply_kernels`` swaps fused ops in from outside, after
the model is built. The norm and activation numerics come from the family's spec.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastune.errors import ConfigError
from fastune.kernels.geglu import geglu_reference
from fastune.kernels.rms_norm import add_rms_norm_reference, rms_norm_reference
from fastune.kernels.rope import apply_rope_reference
from fastune.kernels.swiglu import swiglu_reference
from fastune.models.attention import AttentionMasks, LayerAttention, attend
from fastune.models.config import ModelConfig
from fastune.models.rope import (
    rope_attention_scaling,
    rope_cos_sin,
    rope_inv_freq,
    rope_long_inv_freq,
    select_inv_freq,
)
from fastune.models.spec import LLAMA_NUMERICS, Numerics, get_spec



# The MLP's gated activations, act(gate) * up, by config.json's hidden_act name.
GATED_ACTIVATIONS = {"silu": swiglu_reference, "gelu_pytorch_tanh": geglu_reference}


class RMSNorm(nn.Module):
    """y = (offset + weight) * (x / sqrt(mean(x^2) + eps)), the mean in fp32; where the
    cast back to x.dtype happens is ``numerics.norm_weight_in_fp32`` (see Numerics)."""

    def __init__(self, dim: int, eps: float = 1e-6, numerics: Numerics = LLAMA_NUMERICS):
        super().__init__()
        self.eps = eps
        self.numerics = numerics
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.numerics
        return rms_norm_reference(x, self.weight, self.eps, n.norm_weight_offset, n.norm_weight_in_fp32)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, norm(s)) with s = x + residual (one fused pass once kernels are applied)."""
        n = self.numerics
        return add_rms_norm_reference(x, residual, self.weight, self.eps,
                                      n.norm_weight_offset, n.norm_weight_in_fp32)


class Attention(nn.Module):
    """Grouped-query attention; ``layer`` holds this layer's window and softcap
    (``fastune.models.attention``), and ``config.qk_norm`` adds per-head RMSNorms of
    q and k before RoPE (Qwen3)."""

    def __init__(self, config: ModelConfig, layer: LayerAttention = LayerAttention(),
                 numerics: Numerics = LLAMA_NUMERICS):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.layer = layer
        bias = config.attention_bias
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, numerics)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, numerics)
        # Seam for generation: an object with ``update(input_pos, k, v) -> (k, v)``
        # holding [B, Hk, max_len, D] buffers. None during training.
        self.kv_cache = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        masks: AttentionMasks,
        input_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.q_proj(x).view(bsz, seqlen, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(bsz, seqlen, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(bsz, seqlen, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(q, k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        out = attend(q, k, v, self.layer, masks)
        out = out.transpose(1, 2).reshape(bsz, seqlen, self.num_heads * self.head_dim)
        return self.o_proj(out)

    def rope(self, q, k, cos, sin):
        return apply_rope_reference(q, k, cos, sin)


class MLP(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)); act is SiLU (SwiGLU) for Llama."""

    def __init__(self, config: ModelConfig, numerics: Numerics = LLAMA_NUMERICS):
        super().__init__()
        if numerics.activation not in GATED_ACTIVATIONS:
            raise ConfigError(f"model: unsupported activation {numerics.activation!r}; "
                              f"fastune supports {', '.join(GATED_ACTIVATIONS)}")
        self.activation = numerics.activation
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gated(self.gate_proj(x), self.up_proj(x)))

    def gated(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return GATED_ACTIVATIONS[self.activation](gate, up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, numerics: Numerics = LLAMA_NUMERICS, index: int = 0):
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, numerics)
        self.self_attn = Attention(config, config.layer_attention(index), numerics)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, numerics)
        self.mlp = MLP(config, numerics)

    def forward(self, x, cos, sin, masks: AttentionMasks, input_pos=None):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, masks, input_pos)
        h, normed = self.post_attention_layernorm.forward_add(attn, x)  # h = x + attn
        return h + self.mlp(normed)


class Transformer(nn.Module):
    """Decoder-only LM. ``forward`` returns logits, or the final normed hidden
    states with ``return_hidden=True`` (for a loss that applies ``lm_head`` itself).
    A family with other layers or a scaled embedding subclasses it (``layer_class``,
    ``embed``)."""

    layer_class = DecoderLayer

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        numerics = get_spec(config.model_type).numerics
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.layer_class(config, numerics, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, numerics)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # One RoPE per layer type with its own base (config.layer_rope); the others share
        # ``rope_inv_freq``. Each has LongRoPE's long-context frequencies too (None for
        # other RoPE types) and its cos/sin scale (YaRN, LongRoPE).
        types = [config.layer_type(i) for i in range(config.num_hidden_layers)]
        self.rope_keys = [t if t in config.layer_rope else "" for t in types]
        self.rope_configs = {key: config.layer_rope_config(key) for key in dict.fromkeys(self.rope_keys + [""])}
        self.rope_scales = {key: rope_attention_scaling(c) for key, c in self.rope_configs.items()}
        self._register_rope_buffers()

    def reset_buffers(self, device: Optional[torch.device] = None) -> None:
        """Recompute non-persistent buffers, after building on the meta device."""
        self._register_rope_buffers(device or self.embed_tokens.weight.device)

    def _register_rope_buffers(self, device: Optional[torch.device] = None) -> None:
        for key, config in self.rope_configs.items():
            self.register_buffer(_rope_buffer(key), rope_inv_freq(config, device=device), persistent=False)
            self.register_buffer(_rope_buffer(key, "long"), rope_long_inv_freq(config, device=device),
                                 persistent=False)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        document_ids: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        input_pos: Optional[torch.Tensor] = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """
        tokens: [B, S] token ids.
        position_ids: [B, S]; defaults to 0..S-1 (packed batches restart per document).
        document_ids: [B, S]; when given, attention never crosses a document boundary
            (no dense mask: see ``fastune.models.attention``).
        mask: an explicit boolean SDPA mask [B or 1, 1, S, S_kv] (generation).
        input_pos: [S] cache positions when a KV cache is set up.
        """
        bsz, seqlen = tokens.shape
        if position_ids is None:
            position_ids = torch.arange(seqlen, device=tokens.device).expand(bsz, seqlen)
        masks = AttentionMasks.build([layer.self_attn.layer for layer in self.layers], bsz, seqlen,
                                     tokens.device, document_ids, mask, input_pos)
        h = self.embed(tokens)
        rope = {key: self._cos_sin(key, position_ids, h.dtype) for key in dict.fromkeys(self.rope_keys)}
        for layer, key in zip(self.layers, self.rope_keys):
            h = layer(h, *rope[key], masks, input_pos)
        h = self.norm(h)
        if return_hidden:
            return h
        return self.logits(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head, then the config's final-logit softcapping (Gemma 2), as HF computes it."""
        logits, cap = self.lm_head(hidden), self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(tokens)

    def _cos_sin(self, key: str, position_ids: torch.Tensor, dtype: torch.dtype):
        inv_freq = select_inv_freq(self.rope_configs[key], getattr(self, _rope_buffer(key)),
                                   getattr(self, _rope_buffer(key, "long")), position_ids)
        return rope_cos_sin(inv_freq, position_ids, dtype, self.rope_scales[key])


def _rope_buffer(layer_type: str, regime: str = "") -> str:
    """``rope_inv_freq`` (the model's RoPE), ``rope_long_inv_freq``, ``rope_inv_freq_<type>``..."""
    return f"rope_{regime + '_' if regime else ''}inv_freq" + (f"_{layer_type}" if layer_type else "")

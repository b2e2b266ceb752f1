"""Gemma 2 and Gemma 3's decoder layer and model, on the shared decoder's parts (see ``gemma.py``)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastune.models.attention import AttentionMasks
from fastune.models.config import ModelConfig
from fastune.models.spec import Numerics
from fastune.models.transformer import MLP, Attention, RMSNorm, Transformer


class GemmaDecoderLayer(nn.Module):
    """Four norms: the attention and the MLP outputs are normed before each residual add."""

    def __init__(self, config: ModelConfig, numerics: Numerics, index: int = 0):
        super().__init__()
        eps, hidden = config.rms_norm_eps, config.hidden_size
        self.input_layernorm = RMSNorm(hidden, eps, numerics)
        self.self_attn = Attention(config, config.layer_attention(index), numerics)
        self.post_attention_layernorm = RMSNorm(hidden, eps, numerics)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps, numerics)
        self.mlp = MLP(config, numerics)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps, numerics)

    def forward(self, x, cos, sin, masks: AttentionMasks, input_pos: Optional[torch.Tensor] = None):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, masks, input_pos)
        h = x + self.post_attention_layernorm(attn)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class GemmaTransformer(Transformer):
    layer_class = GemmaDecoderLayer

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(tokens)
        # sqrt(hidden) rounded to the model dtype first, as transformers does (55.5 in bf16 for 3072).
        return h * torch.tensor(self.config.hidden_size ** 0.5, device=h.device).to(h.dtype)

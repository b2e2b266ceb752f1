"""Rotary position embeddings in the Hugging Face half-split (rotate-half) layout.

For a head vector x of size D split into halves (x1, x2), the rotation by the
angles theta_i = pos * inv_freq_i is
    rope(x) = x * cos + rotate_half(x) * sin,   rotate_half(x) = (-x2, x1),
with cos/sin of size D holding the D/2 angles twice. Checkpoints from the Hub
then load with no Q/K permutation. The rotation itself is written once, in
``fastune.kernels.rope.apply_rope_reference``; this module computes the angles.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from fastune.models.config import ModelConfig


def rope_inv_freq(config: ModelConfig, device: Optional[torch.device] = None) -> torch.Tensor:
    """Inverse frequencies [D/2] in fp32, with ``rope_scaling`` applied."""
    dim = config.head_dim
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (config.rope_theta ** exponent)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    if scaling["rope_type"] == "llama3":
        return _llama3_scale(inv_freq, scaling)
    raise ValueError(f"unsupported rope_type {scaling['rope_type']!r}")


def _llama3_scale(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by ``factor``, short ones kept,
    and a smooth interpolation in between."""
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos and sin of shape [B, S, D] for integer positions [B, S], cast to ``dtype``."""
    freqs = position_ids.float()[..., None] * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)

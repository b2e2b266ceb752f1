"""Rotary position embeddings in the Hugging Face half-split (rotate-half) layout.

For a head vector x of size D split into halves (x1, x2), the rotation by the
angles theta_i = pos * inv_freq_i is
    rope(x) = x * cos + rotate_half(x) * sin,   rotate_half(x) = (-x2, x1),
with cos/sin of size D holding the D/2 angles twice. Checkpoints from the Hub
then load with no Q/K permutation. The rotation itself is written once, in
``fastune.kernels.rope.apply_rope_reference``; this module computes the angles.

Every formula follows transformers 5's ``modeling_rope_utils``:
- partial rotary (``partial_rotary_factor``): only the first rotary_dim dims of a
  head rotate, so the frequencies and cos/sin have rotary_dim (not D) entries;
- ``linear`` and ``llama3``: rescaled frequencies;
- ``yarn``: frequencies blended between interpolated and extrapolated by a ramp
  over the dims, and cos/sin multiplied by an attention factor;
- ``longrope``: per-dim factors, the short list or the long list, chosen for each
  forward by its longest position (max(position_ids) + 1 past
  original_max_position_embeddings selects the long one, for training and for
  every generation step alike), and cos/sin multiplied by an attention factor.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from fastune.models.config import ModelConfig


def _exponents(dim: int, device: Optional[torch.device]) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim


def rope_inv_freq(config: ModelConfig, device: Optional[torch.device] = None) -> torch.Tensor:
    """Inverse frequencies [rotary_dim/2] in fp32, with ``rope_scaling`` applied
    (LongRoPE: the short factors)."""
    dim = config.rotary_dim
    scaling = config.rope_scaling
    if scaling is None:
        return 1.0 / (config.rope_theta ** _exponents(dim, device))
    kind = scaling["rope_type"]
    if kind == "longrope":
        return _longrope_inv_freq(config, scaling["short_factor"], device)
    if kind == "yarn":
        return _yarn_inv_freq(config, device)
    inv_freq = 1.0 / (config.rope_theta ** _exponents(dim, device))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_scale(inv_freq, scaling)
    raise ValueError(f"unsupported rope_type {kind!r}")


def rope_long_inv_freq(config: ModelConfig, device: Optional[torch.device] = None) -> Optional[torch.Tensor]:
    """LongRoPE's long-context inverse frequencies; None for every other type."""
    scaling = config.rope_scaling
    if scaling is None or scaling["rope_type"] != "longrope":
        return None
    return _longrope_inv_freq(config, scaling["long_factor"], device)


def context_factor(config: ModelConfig, scaling: dict) -> float:
    """``factor``, or where it is left out (Phi-3) the context extension ratio."""
    factor = scaling.get("factor")
    if factor is None:
        factor = config.max_position_embeddings / scaling["original_max_position_embeddings"]
    return factor


def _longrope_inv_freq(config: ModelConfig, factors: list, device: Optional[torch.device]) -> torch.Tensor:
    ext = torch.tensor(factors, dtype=torch.float32, device=device)
    return 1.0 / (ext * config.rope_theta ** _exponents(config.rotary_dim, device))


def rope_attention_scaling(config: ModelConfig) -> float:
    """The factor cos and sin are multiplied by (1 but for yarn and longrope)."""
    scaling = config.rope_scaling
    kind = scaling["rope_type"] if scaling else "default"
    if kind not in ("yarn", "longrope"):
        return 1.0
    if scaling.get("attention_factor") is not None:
        return scaling["attention_factor"]
    original = scaling["original_max_position_embeddings"]
    if kind == "longrope":
        factor = context_factor(config, scaling)
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    factor = context_factor(config, scaling)
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
    return _yarn_mscale(factor)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(config: ModelConfig, device: Optional[torch.device]) -> torch.Tensor:
    """YaRN: dims that turn fast over the original context keep their frequency
    (extrapolation), slow ones are divided by ``factor`` (interpolation), with a
    linear ramp between the dims where beta_fast and beta_slow rotations fit."""
    scaling = config.rope_scaling
    dim, base = config.rotary_dim, config.rope_theta
    factor = context_factor(config, scaling)
    original = scaling["original_max_position_embeddings"]
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1).to(device)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep


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


def rope_regime_switch(config: ModelConfig) -> Optional[int]:
    """LongRoPE: the cache position whose forward first takes the long factors (the
    original context length), where keys cached before it stop matching; None for
    the RoPE types whose frequencies never change."""
    scaling = config.rope_scaling
    if scaling is None or scaling["rope_type"] != "longrope":
        return None
    return scaling["original_max_position_embeddings"]


def select_inv_freq(config: ModelConfig, inv_freq: torch.Tensor, long_inv_freq: Optional[torch.Tensor],
                    position_ids: torch.Tensor) -> torch.Tensor:
    """``inv_freq``, or with ``long_inv_freq`` (LongRoPE) the long frequencies when
    max(position_ids) + 1 exceeds the original context, as transformers decides on
    each call (a tensor select: no host sync, traceable)."""
    if long_inv_freq is None:
        return inv_freq
    original = config.rope_scaling["original_max_position_embeddings"]
    return torch.where(position_ids.max() + 1 > original, long_inv_freq, inv_freq)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    """cos and sin of shape [B, S, 2 * len(inv_freq)] for integer positions [B, S],
    multiplied by ``scale`` (``rope_attention_scaling``) in fp32, cast to ``dtype``."""
    freqs = position_ids.float()[..., None] * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)

"""Model configuration, read from a Hugging Face ``config.json``.

The family's spec (``fastune.models.spec``) parses and writes config.json; the
Llama-style decoders read both dialects: transformers 4.x (top-level
``rope_theta`` plus ``rope_scaling``) and transformers 5.x (``rope_parameters``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

# One error type for bad configs, shared with the training config (fastune.config).
from fastune.errors import ConfigError
from fastune.models.spec import get_spec

if TYPE_CHECKING:
    from fastune.models.attention import LayerAttention

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
# The scaled types that need the pretraining context length (as transformers 5).
CONTEXT_ROPE_TYPES = ("llama3", "yarn", "longrope")


@dataclasses.dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None, or a dict with "rope_type" (one of SUPPORTED_ROPE_TYPES but "default") and
    # its parameters; llama3, yarn and longrope always carry original_max_position_embeddings.
    rope_scaling: Optional[dict[str, Any]] = None
    # The fraction of each head that RoPE rotates (the first rotary_dim dims; Phi-4-mini).
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 2048
    # Gemma 2: logits = cap * tanh(logits / cap) (forward, generation, and the losses).
    final_logit_softcapping: Optional[float] = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (Qwen2); o_proj never has a bias
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3)
    # Per-layer attention, in transformers 5's vocabulary: layer_types[i] is
    # "full_attention" or "sliding_attention" (None: all full); sliding layers see
    # the last ``sliding_window`` keys, themselves included.
    sliding_window: Optional[int] = None
    layer_types: Optional[tuple[str, ...]] = None
    attn_logit_softcapping: Optional[float] = None  # every layer's score softcap (Gemma 2)
    query_pre_attn_scalar: Optional[float] = None  # scores scaled by its rsqrt, not head_dim's (Gemma)
    # Per-layer-type RoPE: layer type -> {"rope_theta": ..., "rope_scaling": ...}
    # overriding the top-level ones for layers of that type (Gemma 3's local layers).
    layer_rope: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    model_type: str = "llama"  # the key of its ModelSpec (fastune.models.spec)
    # Everything else from config.json, written back unchanged on save.
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def rotary_dim(self) -> int:
        """The rotated dims of each head (transformers: int(head_dim * partial_rotary_factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Parsed by the spec of ``d["model_type"]`` (default llama)."""
        return get_spec(d.get("model_type", "llama"), source).parse_config(d, source)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_hf_dict(d, source=str(path))

    def layer_type(self, i: int) -> str:
        return self.layer_types[i] if self.layer_types else "full_attention"

    def layer_attention(self, i: int) -> "LayerAttention":
        """The attention settings of layer ``i`` (window only on sliding layers)."""
        from fastune.models.attention import LayerAttention

        sliding = self.layer_type(i) == "sliding_attention"
        scalar = self.query_pre_attn_scalar
        return LayerAttention(sliding_window=self.sliding_window if sliding else None,
                              softcap=self.attn_logit_softcapping, scale=scalar ** -0.5 if scalar else None)

    def layer_rope_config(self, layer_type: str) -> "ModelConfig":
        """This config with the RoPE base and scaling of layers of ``layer_type``."""
        override = self.layer_rope.get(layer_type)
        if not override:
            return self
        return dataclasses.replace(self, rope_theta=float(override.get("rope_theta", self.rope_theta)),
                                   rope_scaling=override.get("rope_scaling", self.rope_scaling), layer_rope={})

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json contents, as the family's spec writes them."""
        return get_spec(self.model_type).to_hf_config(self)


def normalize_rope_scaling(scaling: Optional[dict], source: str, top_level_context: Optional[int] = None,
                           max_positions: Optional[int] = None) -> Optional[dict]:
    """The rope_scaling dict fastune keeps: "rope_type" and its parameters. The scaled
    types in CONTEXT_ROPE_TYPES get ``original_max_position_embeddings``: a top-level
    config.json value (``top_level_context``; Phi-3 writes it there) wins, then the
    dict's own, then ``max_positions``, as transformers 5 resolves it."""
    if not scaling:
        return None
    scaling = dict(scaling)
    scaling.pop("rope_theta", None)
    scaling.pop("partial_rotary_factor", None)  # a ModelConfig field of its own
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{source}: unsupported rope_scaling type {rope_type!r}; "
            f"fastune supports {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return None
    if rope_type in CONTEXT_ROPE_TYPES:
        if top_level_context is not None:
            scaling["original_max_position_embeddings"] = top_level_context
        elif max_positions is not None:
            scaling.setdefault("original_max_position_embeddings", max_positions)
    return {"rope_type": rope_type, **scaling}

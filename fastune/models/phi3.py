"""Phi-3, Phi-3.5-mini and Phi-4-mini (transformers' ``phi3``): the shared decoder,
with the checkpoint's fused projections split on load and fused again on save.

- ``qkv_proj`` holds q, k and v stacked by rows; ``gate_up_proj`` gate then up.
  fastune keeps the split Linear layers (the fused kernels, NF4, FSDP and the
  planner see a Llama layer), and the ``StateDictAdapter``'s ``Fused`` declarations
  map the tensors both ways.
- LoRA targets are the checkpoint's names (``qkv_proj``, ``gate_up_proj``), so an
  adapter moves to and from PEFT as is. A LoRA on a fused projection,
  W_qkv + s·B·A with B = [B_q; B_k; B_v], is exactly three split LoRAs that share
  one A (q = x W_qkᵀ + s·(x Aᵀ) B_qᵀ, ...). ``apply_lora`` builds that sharing from
  the same ``Fused`` declaration, and ``fastune.checkpoint.peft`` writes A once and
  the B (and DoRA magnitude) rows stacked. Three independent LoRAs would not be:
  their sum is rank 3r with a block-diagonal structure PEFT cannot hold.
- RoPE: ``longrope`` (Phi-3.5, Phi-4-mini) and ``partial_rotary_factor``
  (Phi-4-mini rotates 3/4 of each head), in ``fastune.models.rope``.
- ``sliding_window`` is read into ``ModelConfig``; the attention honours it where
  the decoder's attention does.
"""

from __future__ import annotations

from typing import Any, Iterable

from fastune.models.config import ModelConfig
from fastune.models.families import (
    OUTPUT,
    mistral_windows,
    build_decoder,
    decoder_hf_config,
    decoder_model_flops,
    parse_decoder_config,
)
from fastune.models.spec import Fused, ModelSpec, StateDictAdapter, register

QKV = Fused("self_attn.qkv_proj.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                         "self_attn.v_proj.weight"),
            lambda c: (c.num_attention_heads * c.head_dim,) + (c.num_key_value_heads * c.head_dim,) * 2)
GATE_UP = Fused("mlp.gate_up_proj.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
                lambda c: (c.intermediate_size,) * 2)
# torchtune's names where it has them (its phi3 builder adapts q/k/v and w1/w3 together).
PHI3_ALIASES = {"o": "o_proj", "output_proj": "o_proj", "down": "down_proj", "output": "lm_head",
                "qkv": "qkv_proj", "gate_up": "gate_up_proj"}


def parse_phi3_config(d: dict[str, Any], source: str) -> ModelConfig:
    d = dict(d)
    scaling = d.get("rope_scaling") or d.get("rope_parameters")
    # transformers' Phi3Config reads the old "su" and "yarn" names as longrope.
    if scaling and (scaling.get("rope_type") or scaling.get("type")) in ("su", "yarn"):
        key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
        d[key] = {**{k: v for k, v in scaling.items() if k != "type"}, "rope_type": "longrope"}
    # Phi3Config's own default for the pretraining context.
    d.setdefault("original_max_position_embeddings", 4096)
    # Phi-3's attention slides on every layer where the config sets a window (as Mistral).
    return parse_decoder_config(d, source, windows=mistral_windows)


def phi3_model_flops(c: ModelConfig, rows: int, seq: int, micro_batches: int = 1, *, full: bool,
                     lora_targets: Iterable[str] = (), lora_rank: int = 0) -> float:
    """The decoder's formula with a fused target counted as its parts (their shared A
    counted once per part: an upper bound by r * hidden per extra part)."""
    parts = {f.module: f.part_modules for f in (QKV, GATE_UP)}
    split = [p for t in lora_targets for p in parts.get(t, (t,))]
    return decoder_model_flops(c, rows, seq, micro_batches, full=full, lora_targets=split, lora_rank=lora_rank)


PHI3 = register(ModelSpec(
    model_type="phi3",
    architecture="Phi3ForCausalLM",
    parse_config=parse_phi3_config,
    to_hf_config=lambda c: decoder_hf_config(c, "Phi3ForCausalLM", "silu", write_attention_bias=False,
                                             write_sliding_window=True),
    build=build_decoder,
    model_flops=phi3_model_flops,
    lora_groups={"attention": ("qkv_proj", "o_proj"), "mlp": ("gate_up_proj", "down_proj"), "output": OUTPUT},
    lora_aliases=PHI3_ALIASES,
    adapter=StateDictAdapter(fused=(QKV, GATE_UP)),
))

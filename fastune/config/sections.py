"""Typed sections of a validated training config.

``fastune.config.load_config`` validates a config (one-line errors with file:line and
did-you-mean) and returns it as an OmegaConf tree, which the recipe and
``_component_`` instantiation read. The layers below the recipe get a typed, frozen
section instead, holding only what they use: ``ModelSection`` (the model to build),
``LoraSection`` (the adapters), ``DistributedSection`` (FSDP and the sharded
checkpoints). ``from_config(cfg)`` builds each from the validated tree, so a section
never needs validating again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class ModelSection:
    checkpoint_dir: Path  # HF folder: config.json, safetensors, tokenizer
    dtype: str  # "bf16" or "fp32"
    use_kernels: bool

    @classmethod
    def from_config(cls, cfg) -> "ModelSection":
        m = cfg.model
        return cls(checkpoint_dir=Path(m.checkpoint_dir), dtype=str(m.dtype), use_kernels=bool(m.use_kernels))


@dataclasses.dataclass(frozen=True)
class LoraSection:
    targets: tuple[str, ...]
    rank: int
    alpha: float
    dropout: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> "LoraSection":
        lora = cfg.lora
        return cls(targets=tuple(lora.targets), rank=int(lora.rank), alpha=float(lora.alpha),
                   dropout=float(lora.dropout))


@dataclasses.dataclass(frozen=True)
class DistributedSection:
    """FSDP2 and the sharded checkpoints; ``model`` says what is sharded and loaded."""

    model: ModelSection
    fsdp_reshard_after_forward: bool = True
    fsdp_cpu_offload: bool = False
    reduce_dtype: str = "fp32"
    timeout_s: int = 1800
    async_save: bool = False

    @classmethod
    def from_config(cls, cfg) -> "DistributedSection":
        d = cfg.distributed
        return cls(model=ModelSection.from_config(cfg), fsdp_reshard_after_forward=bool(d.fsdp_reshard_after_forward),
                   fsdp_cpu_offload=bool(d.fsdp_cpu_offload), reduce_dtype=str(d.reduce_dtype),
                   timeout_s=int(d.timeout_s), async_save=bool(d.async_save))

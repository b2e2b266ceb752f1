"""Typed sections of a validated training config.

``fastune.config.load_config`` validates a config (one-line errors with file:line and
did-you-mean) and returns it as an OmegaConf tree, which the recipe and
``_component_`` instantiation read. The layers below the recipe get a typed, frozen
section instead, holding only what they use: ``ModelSection`` (the model to build),
``LoraSection`` (the adapters), ``DistributedSection`` (FSDP and the sharded
checkpoints), ``DataSection`` (loaders and exact-match examples). ``from_config(cfg)`` builds each from the validated tree, so a section
never needs validating again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional


@dataclasses.dataclass(frozen=True)
class ModelSection:
    checkpoint_dir: Path  # HF folder: config.json, safetensors, tokenizer
    dtype: str  # "bf16" or "fp32"
    kernels: tuple[str, ...]  # the fused ops swapped in (fastune.models.spec.KERNEL_OPS)

    @classmethod
    def from_config(cls, cfg) -> "ModelSection":
        m = cfg.model
        return cls(checkpoint_dir=Path(m.checkpoint_dir), dtype=str(m.dtype), kernels=tuple(m.kernels))


@dataclasses.dataclass(frozen=True)
class LoraSection:
    targets: tuple[str, ...]
    rank: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "default"
    lora_plus_lr_ratio: Optional[float] = None

    @classmethod
    def from_config(cls, cfg) -> "LoraSection":
        lora = cfg.lora
        return cls(targets=tuple(lora.targets), rank=int(lora.rank), alpha=float(lora.alpha),
                   dropout=float(lora.dropout), use_rslora=bool(lora.get("use_rslora", False)),
                   init=str(lora.get("init", "default")), lora_plus_lr_ratio=lora.get("lora_plus_lr_ratio"))


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


def _plain(value):
    """A config value as plain Python (lists and dicts, not OmegaConf nodes)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


@dataclasses.dataclass(frozen=True)
class DatasetSection:
    """The built-in dataset loader's keys, or ``component``: the section itself when it
    names a ``_component_`` builder (called with the tokenizer; other keys are its own)."""

    component: Any = None
    source: Optional[str] = None
    data_files: Any = None  # a path, a list of paths, or {split: paths}
    format: str = "instruct"
    column_map: Optional[dict[str, str]] = None
    split: str = "train"
    train_on_input: bool = False
    packed: bool = False
    max_seq_len: int = 2048
    truncation: bool = True
    max_prompt_len: Optional[int] = None
    shuffle: bool = True
    val_split: Optional[str] = None
    val_fraction: Optional[float] = None

    @classmethod
    def from_config(cls, cfg) -> "DatasetSection":
        from fastune.config.schema import COMPONENT

        data = cfg.dataset
        if COMPONENT in data:
            return cls(component=data, packed=bool(data.get("packed", False)),
                       shuffle=bool(data.get("shuffle", True)))
        return cls(**{f.name: _plain(data[f.name]) for f in dataclasses.fields(cls) if f.name != "component"})


@dataclasses.dataclass(frozen=True)
class DataSection:
    """What the data loaders and the exact-match examples are built from."""

    dataset: DatasetSection
    batch_size: int
    seed: int
    num_workers: int = 0
    exact_match_source: Optional[str] = None  # eval_exact_match.source
    exact_match_max_examples: Optional[int] = None

    @classmethod
    def from_config(cls, cfg) -> "DataSection":
        em = cfg.eval_exact_match
        return cls(dataset=DatasetSection.from_config(cfg), batch_size=int(cfg.batch_size), seed=int(cfg.seed),
                   num_workers=int(cfg.num_workers), exact_match_source=em.source,
                   exact_match_max_examples=em.max_examples)

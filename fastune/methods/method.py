"""What is trained: the whole model (``full``) or LoRA adapters (``lora``, with the
DoRA and QLoRA options ``dora`` and ``qlora``).

This module is the only place that reads the method's name (a test checks it).
Everything else asks the ``Method`` object: how to adapt a built model, which
parameters train, which files a checkpoint folder holds, what a resumed run loads,
and what the sharded path and the planner must know (NF4 base, adapter-only export).

Checkpoint folders (written by ``write_model_files``):

- ``full``: the model in HF format.
- LoRA methods: the PEFT adapter and the tokenizer files at the top, the merged model
  in HF format in ``merged/`` (left out with ``save_adapter_weights_only``). Why the
  merged weights get their own folder: ``fastune.checkpoint.layout``.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from fastune.checkpoint import save_hf_checkpoint
from fastune.checkpoint.layout import MERGED_DIR, adapter_folder, copy_tokenizer_files
from fastune.checkpoint.peft import load_peft_adapter, save_peft_adapter
from fastune.config.sections import LoraSection
from fastune.hub import base_model_name
from fastune.modules.peft import apply_lora, merge_lora

METHODS = ("full", "lora", "dora", "qlora")


@dataclasses.dataclass(frozen=True)
class Method:
    """Full fine-tuning: every parameter trains, checkpoints hold the whole model."""

    name: str = "full"

    @property
    def lora(self) -> Optional[LoraSection]:
        """The adapter settings; None when the base weights themselves train."""
        return None

    @property
    def nf4_base(self) -> bool:
        """Frozen projections stored as NF4 (QLoRA): the sharded path quantizes whole
        layers while loading them, and NF4 needs shards of whole blocks."""
        return False

    @property
    def export_trainable_only(self) -> bool:
        """A checkpoint exports the trainable parameters only (the adapter): the sharded
        path gathers just those."""
        return False

    def adapt(self, model: nn.Module, quantize: bool = True) -> None:
        """Turn a built model (its base weights loaded, or on the meta device) into the
        one this method trains. ``quantize=False`` defers NF4 (meta device: QLoRA
        quantizes while loading the shards)."""

    def weights_dir(self, base_dir: Path, resume: Optional[Path]) -> Path:
        """The HF folder the model's weights are read from: a resumed full run continues
        from its checkpoint's own weights."""
        return Path(resume) if resume is not None else Path(base_dir)

    def resume_weights_dir(self, base_dir: Path, resume: Optional[Path], sharded_state: bool) -> Optional[Path]:
        """Where a sharded run reads its weights from: None when they all come from the
        checkpoint's sharded (DCP) resume state, which holds every trainable weight."""
        return None if sharded_state else self.weights_dir(base_dir, resume)

    def load_resumed(self, model: nn.Module, resume: Path) -> None:
        """What a resumed run loads over the weights of ``weights_dir`` (nothing here)."""

    def write_model_files(self, model: nn.Module, folder: Path, source_dir: Path,
                          state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
        """The model files of a checkpoint folder. ``state_dict``: the full state dict
        gathered from the shards of a sharded run (the model's own by default)."""
        save_hf_checkpoint(model if state_dict is None else state_dict, model.config, folder, source_dir=source_dir)

    def describe(self) -> str:
        return self.name

    def wrote(self, recorded: Optional[str]) -> bool:
        """Whether a checkpoint whose trainer state records method ``recorded`` was
        written by this method (a run resumes only its own method's checkpoints)."""
        return recorded == self.name

    def lighter_variant(self) -> Optional[str]:
        """The method name the planner tries when this one does not fit (or None)."""
        return None

    def reference_model(self, model: nn.Module) -> Optional[nn.Module]:
        """The model a preference objective's reference log-probs come from: here the
        base weights themselves train, so a frozen copy of the model as built (call it
        before the optimizer first steps). It costs one more model's weights in memory."""
        return copy.deepcopy(model).requires_grad_(False)


@dataclasses.dataclass(frozen=True)
class LoRAMethod(Method):
    """LoRA adapters on frozen base weights; DoRA (``use_dora``) and an NF4 base
    (``quantize_base``, QLoRA) are options of the same method."""

    name: str = "lora"
    options: LoraSection = LoraSection(targets=("q_proj", "v_proj"), rank=8, alpha=16.0)
    use_dora: bool = False
    quantize_base: bool = False
    adapter_only: bool = False  # save_adapter_weights_only

    @property
    def lora(self) -> LoraSection:
        return self.options

    @property
    def nf4_base(self) -> bool:
        return self.quantize_base

    @property
    def export_trainable_only(self) -> bool:
        return self.adapter_only

    def adapt(self, model: nn.Module, quantize: bool = True) -> None:
        o = self.options
        apply_lora(model, list(o.targets), o.rank, o.alpha, o.dropout, use_dora=self.use_dora,
                   quantize_base=self.quantize_base and quantize, use_rslora=o.use_rslora, init=o.init)

    def weights_dir(self, base_dir: Path, resume: Optional[Path]) -> Path:
        return Path(base_dir)  # the adapter of a resumed run goes over the base

    def resume_weights_dir(self, base_dir: Path, resume: Optional[Path], sharded_state: bool) -> Optional[Path]:
        return Path(base_dir)  # the frozen base; the adapter comes from the checkpoint

    def load_resumed(self, model: nn.Module, resume: Path) -> None:
        load_peft_adapter(model, adapter_folder(resume) or Path(resume))

    def write_model_files(self, model: nn.Module, folder: Path, source_dir: Path,
                          state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
        source_dir = Path(source_dir)
        copy_tokenizer_files(source_dir, folder)
        if not self.adapter_only:
            save_hf_checkpoint(merge_lora(model, state_dict), model.config, folder / MERGED_DIR,
                               source_dir=source_dir)
        save_peft_adapter(model, folder, base_model_name_or_path=base_model_name(source_dir), state_dict=state_dict)

    def describe(self) -> str:
        o = self.options
        return f"{self.name} (rank {o.rank}, alpha {o.alpha:g}, on {', '.join(o.targets)})"

    def reference_model(self, model: nn.Module) -> Optional[nn.Module]:
        """None: the same model with every adapter disabled is the frozen base, no copy."""
        return None

    def lighter_variant(self) -> Optional[str]:
        # DoRA has no NF4 counterpart here; QLoRA is already the lightest.
        return "qlora" if not (self.use_dora or self.quantize_base) else None


def method_from_config(cfg) -> Method:
    """The ``Method`` of a validated config: its ``method``, ``lora`` and
    ``save_adapter_weights_only`` keys."""
    name = cfg.method
    if name not in METHODS:
        raise ValueError(f"method: unknown method {name!r}; choose from {', '.join(METHODS)}")
    if name == "full":
        return Method()
    return LoRAMethod(name=name, options=LoraSection.from_config(cfg), use_dora=name == "dora",
                      quantize_base=name == "qlora", adapter_only=bool(cfg.save_adapter_weights_only))

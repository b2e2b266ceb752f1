"""Model families, keyed by Hugging Face ``model_type``.

A ``ModelSpec`` holds what differs between families: how config.json is read,
how the modules are built, how checkpoint keys map (and which tensors are
split or fused on the way), which linear layers exist and which LoRA may adapt,
the FLOP formula of bench, and the numerics of the norm and the activation.
Everything that names a projection or a family reads it from here.

This module imports no torch, so the config schema can read the names cheaply;
the families register themselves in ``fastune.models.families``.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Union

from fastune.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fastune.models.config import ModelConfig

# The ops ``fastune.modules.kernels.apply_kernels`` can swap for a fused kernel.
KERNEL_OPS = ("rms_norm", "rope", "swiglu", "lora", "loss")


@dataclasses.dataclass(frozen=True)
class Numerics:
    """How a family's norm and MLP compute. The model's RMSNorm is
    ``(weight_offset + w) * xhat`` with xhat = x / rms(x) in fp32; with
    ``weight_in_fp32`` the product is taken in fp32 and then cast (Gemma), else xhat
    is cast to the input dtype first (HF Llama). ``activation`` gates the MLP."""

    norm_weight_offset: float = 0.0
    norm_weight_in_fp32: bool = False
    activation: str = "silu"


# The numerics fastune.kernels' fused RMSNorm and SwiGLU compute.
LLAMA_NUMERICS = Numerics()


@dataclasses.dataclass(frozen=True)
class Fused:
    """One HF tensor that holds several fastune tensors stacked along dim 0
    (Phi-3's ``qkv_proj``). ``name`` and ``parts`` are key suffixes inside a layer;
    ``sizes(config)`` gives each part's rows."""

    name: str
    parts: tuple[str, ...]
    sizes: Callable[["ModelConfig"], tuple[int, ...]]

    @property
    def module(self) -> str:
        """The fused layer's attribute name (``qkv_proj``), as LoRA targets name it."""
        return self.name.removesuffix(".weight").rpartition(".")[2]

    @property
    def part_modules(self) -> tuple[str, ...]:
        """The split layers' attribute names (``q_proj``, ``k_proj``, ``v_proj``)."""
        return tuple(p.removesuffix(".weight").rpartition(".")[2] for p in self.parts)


@dataclasses.dataclass(frozen=True)
class StateDictAdapter:
    """fastune keys <-> HF keys. A key gets ``prefix`` unless it is in
    ``unprefixed``; a ``Fused`` tensor is split on load and concatenated on save.
    Loading also reads other layouts of the same weights: ``renames`` maps a key prefix
    in the file to the one it stands for, and keys under an ``ignored`` prefix belong to
    another model in the same checkpoint (a multimodal model's vision tower)."""

    prefix: str = "model."
    unprefixed: tuple[str, ...] = ("lm_head.weight",)
    fused: tuple[Fused, ...] = ()
    renames: tuple[tuple[str, str], ...] = ()
    ignored: tuple[str, ...] = ()

    def canonical_key(self, file_key: str) -> Optional[str]:
        """The HF key (as ``to_hf_key`` writes it) of a key found in a checkpoint file;
        None for an ignored one."""
        if file_key.startswith(self.ignored):
            return None
        for old, new in self.renames:
            if file_key.startswith(old):
                return new + file_key[len(old):]
        return file_key

    def to_hf_key(self, key: str) -> str:
        return key if key in self.unprefixed else self.prefix + key

    def from_hf_key(self, key: str) -> str:
        return key if key in self.unprefixed else key.removeprefix(self.prefix)

    def from_hf(self, hf_key: str, tensor: "torch.Tensor", config: "ModelConfig") -> dict[str, "torch.Tensor"]:
        """The fastune tensors held by one HF tensor (one, or the parts of a fused one)."""
        key = self.from_hf_key(hf_key)
        for f in self.fused:
            if key.endswith(f.name):
                stem = key[: -len(f.name)]
                # Own storage per part: safetensors refuses to save tensors that share it.
                pieces = tensor.split(list(f.sizes(config)), dim=0)
                return {stem + part: piece.clone() for part, piece in zip(f.parts, pieces)}
        return {key: tensor}

    def to_hf(self, state_dict: Mapping[str, "torch.Tensor"], config: "ModelConfig") -> dict[str, "torch.Tensor"]:
        """HF key -> tensor, in ``state_dict`` order, parts of fused tensors concatenated
        (at the position of their first part). Works on meta tensors (for shapes)."""
        import torch

        out = {}
        for key, tensor in state_dict.items():
            fused = next((f for f in self.fused if key.endswith(f.parts)), None)
            if fused is None:
                out[self.to_hf_key(key)] = tensor
                continue
            part = next(p for p in fused.parts if key.endswith(p))
            stem = key[: -len(part)]
            if part == fused.parts[0]:
                out[self.to_hf_key(stem + fused.name)] = torch.cat([state_dict[stem + p] for p in fused.parts])
        return out


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model family. ``lora_groups`` name the linear layers by role
    (attention, mlp, output); ``lora_aliases`` are other spellings of them."""

    model_type: str
    architecture: str  # config.json "architectures", e.g. "LlamaForCausalLM"
    parse_config: Callable[[dict[str, Any], str], "ModelConfig"]  # (config.json dict, source) -> config
    to_hf_config: Callable[["ModelConfig"], dict[str, Any]]  # config -> config.json dict
    build: Callable[["ModelConfig"], "nn.Module"]
    model_flops: Callable[..., float]  # (config, rows, seq, *, trained, lora_targets, lora_rank)
    lora_groups: dict[str, tuple[str, ...]]
    lora_aliases: dict[str, str] = dataclasses.field(default_factory=dict)
    adapter: StateDictAdapter = StateDictAdapter()
    numerics: Numerics = LLAMA_NUMERICS

    @property
    def lora_targets(self) -> tuple[str, ...]:
        return tuple(name for group in self.lora_groups.values() for name in group)

    @property
    def layer_projections(self) -> tuple[str, ...]:
        """The linear layers inside a decoder layer (what QLoRA and quantize store
        quantized); a fused checkpoint name stands for its split parts."""
        parts = {f.module: f.part_modules for f in self.adapter.fused}
        return tuple(p for role, group in self.lora_groups.items() if role != "output"
                     for n in group for p in parts.get(n, (n,)))

    def lora_fused(self) -> tuple[Fused, ...]:
        """The fused checkpoint tensors that are LoRA targets: a LoRA on one is a LoRA
        on each part with one shared A (``fastune.modules.peft``)."""
        return tuple(f for f in self.adapter.fused if f.module in self.lora_targets)


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    _REGISTRY[spec.model_type] = spec
    return spec


def _registry() -> dict[str, ModelSpec]:
    # The built-in families are registered by ``fastune.models``' __init__, which runs
    # before this module.
    return _REGISTRY


def supported_model_types() -> tuple[str, ...]:
    return tuple(_registry())


def get_spec(model_type: str, source: str = "config.json") -> ModelSpec:
    """The spec of ``model_type``; a one-line ``ConfigError`` naming ``source`` otherwise."""
    registry = _registry()
    if model_type not in registry:
        raise ConfigError(f"{source}: unsupported model_type {model_type!r}; "
                          f"fastune supports {', '.join(registry)}")
    return registry[model_type]


def all_lora_targets() -> tuple[str, ...]:
    """Every family's LoRA target names, in first-seen order (the config schema's choices,
    checked against the model's own once it is loaded)."""
    names: dict[str, None] = {}
    for spec in _registry().values():
        names.update(dict.fromkeys(spec.lora_targets))
    return tuple(names)


def all_layer_projections() -> tuple[str, ...]:
    """Every family's decoder-layer projection names, in first-seen order."""
    names: dict[str, None] = {}
    for spec in _registry().values():
        names.update(dict.fromkeys(spec.layer_projections))
    return tuple(names)


def all_lora_aliases() -> dict[str, str]:
    aliases: dict[str, str] = {}
    for spec in _registry().values():
        aliases.update(spec.lora_aliases)
    return aliases


def normalize_kernel_ops(ops: Union[str, bool, None, Iterable[str]], source: str = "kernels") -> tuple[str, ...]:
    """``"all"``/True, ``"none"``/False/None, or a list of names from KERNEL_OPS ->
    the names, in KERNEL_OPS order. Unknown names are a one-line ConfigError."""
    if ops is True or ops == "all":
        return KERNEL_OPS
    if ops is False or ops is None or ops == "none":
        return ()
    if isinstance(ops, str):
        ops = [ops]
    names = set()
    for op in ops:
        if op not in KERNEL_OPS:
            close = difflib.get_close_matches(str(op), KERNEL_OPS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: unknown kernel op {op!r}{hint}; use all, none, "
                              f"or a list of {', '.join(KERNEL_OPS)}")
        names.add(op)
    return tuple(op for op in KERNEL_OPS if op in names)


def describe_kernels(ops: Iterable[str]) -> str:
    """``on`` (all), ``off`` (none), or ``on for rope, swiglu``, for summaries."""
    ops = tuple(ops)
    if set(ops) == set(KERNEL_OPS):
        return "on"
    return f"on for {', '.join(ops)}" if ops else "off"

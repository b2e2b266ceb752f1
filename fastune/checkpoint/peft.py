"""LoRA adapters on disk in PEFT's format: ``adapter_model.safetensors`` plus
``adapter_config.json``, which ``peft.PeftModel.from_pretrained`` and vLLM load.

Keys: fastune ``layers.N.self_attn.q_proj.lora_A.weight`` is PEFT's
``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight``;
``lm_head.lora_A.weight`` is ``base_model.model.lm_head.lora_A.weight``; a DoRA
magnitude is ``...q_proj.lora_magnitude_vector`` in both. No permutation is
needed, since fastune's RoPE uses the Hugging Face layout.

Fused checkpoint projections (Phi-3's ``qkv_proj``, the family's ``Fused``
declarations that are LoRA targets): fastune adapts the split parts with one
shared A, so the file holds that A once under the fused name, and the parts' B
(and DoRA magnitudes) stacked by rows, which is PEFT's LoRA on the fused layer
exactly; loading splits them again.

PiSSA and OLoRA adapters (which start from W and train against W_res = W - s·B₀A₀)
are written as PEFT writes them with ``path_initial_model_for_weight_conversion``:
a plain LoRA of rank 2r on the original W, A' = [A ; A₀], B' = [B | -B₀], alpha
doubled (times sqrt(2) for rsLoRA, so the scale is the same), ``init_lora_weights:
true``. PEFT then loads it on the unmodified base model, and so does the merged
export. A run that resumes rebuilds W_res, A₀ and B₀ from W (the init is
deterministic) and takes A, B back as the first r rows of A' and columns of B'.
A LoftQ adapter is a plain rank-r LoRA over NF4(W), which is what PEFT's QLoRA load
of the original checkpoint gives (``init_lora_weights: true``, so that PEFT does
not run LoftQ again on load).

``save_peft_adapter`` writes into the directory it is given. It is not atomic by
itself: the training loop writes the whole checkpoint into a temporary folder
and renames it into place.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from fastune.checkpoint.hf import from_hf_key, to_hf_key, write_safetensors
from fastune.checkpoint.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from fastune.models.spec import Fused, get_spec
from fastune.modules.lora import RESIDUAL_INITS, LoRAError, LoRALinear
from fastune.modules.peft import (
    LORA_PARAM_SUFFIXES,
    LORA_TARGETS,
    LoRASettings,
    apply_lora,
    is_lora_key,
    lora_settings,
)

PEFT_PREFIX = "base_model.model."


def to_peft_key(key: str) -> str:
    """fastune adapter key -> PEFT key: the adapted module's HF name under
    PEFT's ``base_model.model.`` prefix, then the adapter parameter's name."""
    module, param = _split_adapter_key(key)
    return PEFT_PREFIX + to_hf_key(f"{module}.weight").removesuffix(".weight") + param


def from_peft_key(key: str) -> str:
    """PEFT adapter key -> fastune key (the inverse of ``to_peft_key``)."""
    module, param = _split_adapter_key(key.removeprefix(PEFT_PREFIX))
    return from_hf_key(f"{module}.weight").removesuffix(".weight") + param


def _split_adapter_key(key: str) -> tuple[str, str]:
    """``"x.q_proj.lora_A.weight"`` -> ``("x.q_proj", ".lora_A.weight")``."""
    for suffix in LORA_PARAM_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    raise LoRAError(f"{key!r} is not a LoRA adapter key (expected a name ending in {', '.join(LORA_PARAM_SUFFIXES)})")


def adapter_config(settings: LoRASettings, base_model_name_or_path: Optional[str]) -> dict[str, Any]:
    """The adapter_config.json contents for ``settings`` (PEFT's LoraConfig fields)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": list(settings.targets),
        "use_dora": settings.use_dora,
        "use_rslora": settings.use_rslora,
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def save_peft_adapter(
    model: nn.Module,
    out_dir: str | Path,
    base_model_name_or_path: Optional[str] = None,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
) -> None:
    """Write the model's adapter into ``out_dir`` (created if missing) in PEFT format.

    The settings (targets, rank, alpha, dropout, DoRA) are read from the model's
    LoRA layers, so the config cannot disagree with the weights. ``state_dict``
    defaults to ``model.state_dict()``; under FSDP pass the gathered full one.
    """
    settings = lora_settings(model)
    state_dict = model.state_dict() if state_dict is None else state_dict
    adapter = _fuse({k: v for k, v in state_dict.items() if is_lora_key(k)}, _lora_fused(model))
    tensors = {to_peft_key(k): v.detach().to("cpu").contiguous() for k, v in adapter.items()}
    if settings.init in RESIDUAL_INITS:  # never with fused projections (apply_lora refuses)
        tensors, settings = _against_original_weight(model, tensors, settings)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors(out_dir / ADAPTER_WEIGHTS, tensors)
    config = adapter_config(settings, base_model_name_or_path)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _against_original_weight(model: nn.Module, tensors: dict[str, torch.Tensor], settings: LoRASettings):
    """A PiSSA/OLoRA adapter as the rank-2r LoRA on the original W (module docstring)."""
    out = dict(tensors)
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            a, b = to_peft_key(f"{name}.lora_A.weight"), to_peft_key(f"{name}.lora_B.weight")
            out[a] = torch.cat([tensors[a], m.initial_A.to("cpu", tensors[a].dtype)], dim=0).contiguous()
            out[b] = torch.cat([tensors[b], -m.initial_B.to("cpu", tensors[b].dtype)], dim=1).contiguous()
    alpha = settings.alpha * (math.sqrt(2) if settings.use_rslora else 2)
    return out, dataclasses.replace(settings, rank=2 * settings.rank, alpha=alpha, init="default")


def read_adapter_settings(adapter_dir: str | Path) -> LoRASettings:
    """The LoRA settings in ``adapter_dir/adapter_config.json``; a clear error for
    PEFT features fastune does not implement."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise LoRAError(f"{path}: adapter config not found")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LoRAError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if config.get("peft_type") != "LORA":
        raise LoRAError(f"{path}: peft_type is {config.get('peft_type')!r}; fastune loads LORA adapters only")
    unsupported = {
        "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
        "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    for key, default in unsupported.items():
        if config.get(key, default) not in (default, None, {}, []):
            raise LoRAError(f"{path}: {key}={config[key]!r} is not supported by fastune (expected {default!r})")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise LoRAError(f"{path}: missing required key {key!r}")
    if config.get("init_lora_weights", True) not in (True, False, "gaussian"):
        raise LoRAError(
            f"{path}: init_lora_weights={config['init_lora_weights']!r}: save the adapter with PEFT's "
            "path_initial_model_for_weight_conversion (a plain LoRA on the original weights)"
        )
    if not isinstance(config["r"], int) or config["r"] < 1:
        raise LoRAError(f"{path}: r={config['r']!r} must be a positive integer")
    targets = config["target_modules"]
    if not isinstance(targets, list) or not set(targets) <= set(LORA_TARGETS):
        raise LoRAError(
            f"{path}: target_modules={targets!r} is not supported; fastune adapts a list of "
            f"{', '.join(LORA_TARGETS)}"
        )
    return LoRASettings(
        targets=tuple(t for t in LORA_TARGETS if t in targets),
        rank=config["r"],
        alpha=config["lora_alpha"],
        dropout=config.get("lora_dropout", 0.0),
        use_dora=bool(config.get("use_dora", False)),
        use_rslora=bool(config.get("use_rslora", False)),
    )


def load_peft_adapter(model: nn.Module, adapter_dir: str | Path, quantize_base: bool = False) -> LoRASettings:
    """Load a PEFT LoRA/DoRA adapter into ``model`` to resume or continue training.

    A model without LoRA layers gets them first (``apply_lora`` with the
    adapter's settings and ``quantize_base``); a model with LoRA layers must have
    the adapter's settings. Every adapter tensor must be present with the right
    shape; DoRA magnitudes come from the file (do not re-init them afterwards).
    On a model sharded by FSDP2, each rank takes its shard of every tensor.
    """
    adapter_dir = Path(adapter_dir)
    settings = read_adapter_settings(adapter_dir)
    loaded = _split(_read_adapter_tensors(adapter_dir / ADAPTER_WEIGHTS), _lora_fused(model), model)
    if not any(isinstance(m, LoRALinear) for m in model.modules()):
        apply_lora(model, settings.targets, settings.rank, settings.alpha, settings.dropout,
                   settings.use_dora, quantize_base, settings.use_rslora)
    model_settings = lora_settings(model)
    if model_settings.init in RESIDUAL_INITS and settings.rank == 2 * model_settings.rank:
        # A PiSSA/OLoRA run resumes: A and B are the first halves of A' and B'.
        r = model_settings.rank
        loaded = {k: v[:r] if k.endswith(".lora_A.weight") else v[:, :r] if k.endswith(".lora_B.weight") else v
                  for k, v in loaded.items()}
        alpha = settings.alpha / (math.sqrt(2) if settings.use_rslora else 2)
        settings = dataclasses.replace(settings, rank=r, alpha=alpha, init=model_settings.init)
    _check_same_settings(model_settings, settings, adapter_dir / ADAPTER_CONFIG)
    path = adapter_dir / ADAPTER_WEIGHTS
    params = {k: v for k, v in model.state_dict(keep_vars=True).items() if is_lora_key(k)}
    # Check everything before copying anything, so a bad file changes nothing.
    unexpected = sorted(set(loaded) - set(params))
    if unexpected:
        raise LoRAError(f"{path}: unexpected key {to_peft_key(unexpected[0])!r} (not an adapter of this model)")
    for key, param in params.items():
        if key not in loaded:
            raise LoRAError(f"{path}: missing key {to_peft_key(key)!r}")
        if loaded[key].shape != param.shape:
            raise LoRAError(
                f"{path}: key {to_peft_key(key)!r} has shape {list(loaded[key].shape)}, "
                f"the model expects {list(param.shape)}"
            )
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(_like(param, loaded[key]))
    return settings


def _lora_fused(model: nn.Module) -> tuple[Fused, ...]:
    config = getattr(model, "config", None)
    return get_spec(config.model_type).lora_fused() if config is not None else ()


def _fused_part(key: str, groups: tuple[Fused, ...]) -> Optional[tuple[str, Fused, str, str]]:
    """(layer stem, group, module name, parameter suffix) when ``key`` is an adapter
    tensor of a fused group's part (or, for split, of the fused module itself)."""
    module, suffix = _split_adapter_key(key)
    stem, _, name = module.rpartition(".")
    for group in groups:
        if name == group.module or name in group.part_modules:
            return stem, group, name, suffix
    return None


def _fuse(adapter: dict[str, torch.Tensor], groups: tuple[Fused, ...]) -> dict[str, torch.Tensor]:
    """fastune adapter tensors -> the fused groups' PEFT tensors, in key order: the
    shared A once, B and DoRA magnitudes of the parts concatenated by rows."""
    out = {}
    for key, tensor in adapter.items():
        found = _fused_part(key, groups)
        if found is None:
            out[key] = tensor
            continue
        stem, group, name, suffix = found
        if name != group.part_modules[0]:
            continue
        parts = [adapter[f"{stem}.{part}{suffix}"] for part in group.part_modules]
        out[f"{stem}.{group.module}{suffix}"] = tensor if suffix == ".lora_A.weight" else torch.cat(parts)
    return out


def _split(loaded: dict[str, torch.Tensor], groups: tuple[Fused, ...], model: nn.Module) -> dict[str, torch.Tensor]:
    """The inverse of ``_fuse``: a fused module's A for every part, its B and
    magnitude split by the parts' rows."""
    out = {}
    for key, tensor in loaded.items():
        found = _fused_part(key, groups)
        if found is None or found[2] != found[1].module:
            out[key] = tensor
            continue
        stem, group, _, suffix = found
        sizes = list(group.sizes(model.config))
        if suffix != ".lora_A.weight" and tensor.shape[0] != sum(sizes):
            raise LoRAError(f"adapter key {to_peft_key(key)!r} has {tensor.shape[0]} rows; "
                            f"{group.module} has {sum(sizes)}")
        pieces = [tensor] * len(sizes) if suffix == ".lora_A.weight" else tensor.split(sizes)
        out.update({f"{stem}.{part}{suffix}": piece.clone() for part, piece in zip(group.part_modules, pieces)})
    return out


def _like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``param``: this rank's shard when FSDP2 sharded ``param``."""
    if isinstance(param, DTensor):  # every rank read the same file: each slices its own shard
        return distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements,
                                 src_data_rank=None)
    return full


def _read_adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    """fastune key -> tensor, for the adapter parameters in a PEFT adapter file."""
    if not path.is_file():
        raise LoRAError(f"{path}: adapter weights not found")
    try:
        raw = load_file(str(path))
    except SafetensorError as e:
        raise LoRAError(f"{path}: not a readable safetensors file ({e})") from None
    loaded = {}
    for key, tensor in raw.items():
        if ".base_layer." in key:  # PEFT also saves an adapted lm_head's frozen base weight
            continue
        if not (key.startswith(PEFT_PREFIX) and is_lora_key(key)):
            raise LoRAError(f"{path}: unexpected key {key!r} (not a LoRA adapter parameter)")
        loaded[from_peft_key(key)] = tensor
    return loaded


def _check_same_settings(model_settings: LoRASettings, file_settings: LoRASettings, path: Path) -> None:
    for field in ("targets", "rank", "alpha", "use_dora", "use_rslora"):
        ours, theirs = getattr(model_settings, field), getattr(file_settings, field)
        if ours != theirs and not (field == "alpha" and math.isclose(ours, theirs)):
            raise LoRAError(f"{path}: {field} is {theirs!r} in the adapter but {ours!r} in the model")

"""Find and load a model to generate or evaluate with.

``CHECKPOINT`` may be:

- a Hugging Face checkpoint folder (``config.json`` + safetensors), downloaded or
  written by a run (``output_dir/epoch_N``; for LoRA its ``merged/`` model);
- a training run's ``output_dir``: its latest complete ``epoch_N``/``step_N``;
- a checkpoint written with ``save_adapter_weights_only``: the base model named in
  its ``adapter_config.json`` with the adapter merged in;
- a checkpoint written by ``fastune quantize``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
import yaml
from torch import nn

from fastune.checkpoint.layout import (
    ADAPTER_CONFIG,
    CONFIG_NAME,
    RUN_CONFIG,
    adapter_folder,
    checkpoint_dirs,
    has_hf_weights,
    model_folder,
)
from fastune.data import Tokenizer, load_tokenizer
from fastune.errors import FastuneError


class CheckpointNotFound(FastuneError):
    """A path that holds no checkpoint fastune can load."""


def resolve_checkpoint(path: Union[str, Path]) -> Path:
    """The model folder ``path`` names: itself, or a run's latest checkpoint; of a LoRA
    checkpoint, its merged model (``merged/``) when it has one."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointNotFound(f"{path}: no such directory")
    if not (path / CONFIG_NAME).is_file() and adapter_folder(path) is None:
        found = checkpoint_dirs(path)
        if not found:
            raise CheckpointNotFound(f"{path}: neither a checkpoint (no {CONFIG_NAME} or {ADAPTER_CONFIG}) nor a "
                                     "training output_dir (no epoch_N or step_N checkpoint in it)")
        path = found[-1]
    return model_folder(path)


def load_for_inference(
    path: Union[str, Path],
    dtype: Union[str, torch.dtype] = "bf16",
    device: Union[str, torch.device] = "cpu",
    use_kernels: Optional[bool] = None,
) -> tuple[nn.Module, Tokenizer, Path]:
    """(model in eval mode, its tokenizer, the checkpoint folder used) for ``path``."""
    model, ckpt = load_model(path, dtype, device, use_kernels)
    return model, load_tokenizer(ckpt), ckpt


def load_model(
    path: Union[str, Path],
    dtype: Union[str, torch.dtype] = "bf16",
    device: Union[str, torch.device] = "cpu",
    use_kernels: Optional[bool] = None,
) -> tuple[nn.Module, Path]:
    """(model in eval mode, without gradients; the checkpoint folder used) for ``path``.
    A quantized checkpoint keeps the dtype it was quantized with."""
    from fastune.checkpoint.quantized import is_quantized, load_quantized
    from fastune.methods.build import build_model
    from fastune.methods.method import Method

    ckpt = resolve_checkpoint(path)
    kernels = "all" if use_kernels is None else use_kernels
    if is_quantized(ckpt):
        model = load_quantized(ckpt, device=device, kernels=kernels)
    elif has_hf_weights(ckpt) or adapter_folder(ckpt) is None:
        model = build_model(ckpt, Method(), dtype, device, kernels)
    else:
        model = _merged_adapter_model(ckpt, dtype, device, kernels)
    model.requires_grad_(False)
    return model.eval(), ckpt


def _merged_adapter_model(ckpt: Path, dtype, device, kernels) -> nn.Module:
    """Base model + the checkpoint's adapter, merged into plain weights."""
    from fastune.checkpoint.peft import load_peft_adapter
    from fastune.methods.build import build_model
    from fastune.methods.method import Method
    from fastune.models.spec import get_spec
    from fastune.modules.kernels import apply_kernels, enabled_kernels
    from fastune.modules.peft import merge_lora

    adapter = adapter_folder(ckpt)
    model = build_model(_local_base_model(ckpt, adapter), Method(), dtype, device, kernels)
    load_peft_adapter(model, adapter)
    merged = merge_lora(model)
    with torch.device("meta"):
        plain = get_spec(model.config.model_type).build(model.config)
    plain.load_state_dict(merged, assign=True)
    plain.reset_buffers(torch.device(device))
    plain.tie_weights()
    apply_kernels(plain, enabled_kernels(model))
    return plain


def _local_base_model(ckpt: Path, adapter: Path) -> Path:
    """The base model folder of an adapter-only checkpoint: the adapter's
    ``base_model_name_or_path`` when that is a folder here, else the
    ``model.checkpoint_dir`` of the run's config.yaml (an adapter trained on a
    downloaded model names its Hub repo instead)."""
    config_file = adapter / ADAPTER_CONFIG
    named = json.loads(config_file.read_text()).get("base_model_name_or_path") or ""
    candidates = [Path(named)] if named else []
    run_config = ckpt.parent / RUN_CONFIG
    if run_config.is_file():
        candidates.append(Path(yaml.safe_load(run_config.read_text())["model"]["checkpoint_dir"]))
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise CheckpointNotFound(
        f"{config_file}: {ckpt} holds only an adapter, and its base model {named!r} is not a folder here; "
        "download it (`fastune download`) and put its path in base_model_name_or_path"
    )

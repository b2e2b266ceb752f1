"""Reading HF safetensors weights into sharded (or whole) parameters: each rank reads
only its own rows, through ``torch.distributed.checkpoint``'s HuggingFaceStorageReader;
QLoRA reads, quantizes and shards one decoder layer at a time."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _dense_base_keys(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """HF key -> tensor for the weights of ``module`` an HF checkpoint holds and that are
    not loaded yet: not adapters, not NF4, and no tied ``lm_head`` (the file has none)."""
    from fastune.checkpoint.hf import to_hf_key
    from fastune.modules.peft import is_lora_key

    tied = getattr(getattr(module, "config", None), "tie_word_embeddings", False)
    out = {}
    for key, tensor in module.state_dict().items():
        if is_lora_key(key) or (tied and key == "lm_head.weight"):
            continue
        if _is_nf4(_local(tensor)):
            continue
        out[to_hf_key(prefix + key)] = tensor
    return out


def load_hf_weights(module: nn.Module, checkpoint_dir: Path, prefix: str = "", whole: bool = False) -> None:
    """Fill ``module``'s base weights (sharded DTensors or plain tensors) from the HF
    safetensors in ``checkpoint_dir``, converting to their dtype. Each rank reads only its
    shards; ``whole=True`` reads plain (unsharded) tensors on every rank independently.
    ``prefix`` is ``module``'s name in the model (``layers.3.``)."""
    import torch.distributed.checkpoint as dcp

    state = _dense_base_keys(module, prefix)
    reader = dcp.HuggingFaceStorageReader(str(checkpoint_dir))
    _check_against_checkpoint(state, reader, checkpoint_dir)
    _dcp_load(state, storage_reader=reader, no_dist=whole or not dist.is_initialized())


def _dcp_load(state: dict[str, Any], no_dist: bool, **kwargs) -> None:
    """``dcp.load``; without its warning for a single-process load, which here is meant."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, no_dist=no_dist, **kwargs)


def _check_against_checkpoint(state: dict[str, torch.Tensor], reader, checkpoint_dir: Path) -> None:
    """A one-line CheckpointError for a missing key or a wrong shape, before reading data
    (``dcp.load`` would fail later with a long planner message)."""
    from fastune.checkpoint.hf import CheckpointError

    stored = reader.read_metadata().state_dict_metadata
    for key, tensor in state.items():
        if key not in stored:
            raise CheckpointError(f"{checkpoint_dir}: missing key {key!r}")
        if tuple(stored[key].size) != tuple(tensor.shape):
            raise CheckpointError(f"{checkpoint_dir}: key {key!r} has shape {list(stored[key].size)}, "
                                  f"config.json implies {list(tensor.shape)}")


def _load_and_quantize_layer(layer: nn.Module, prefix: str, checkpoint_dir: Path, device: torch.device,
                             world_size: int) -> None:
    """QLoRA: allocate one decoder layer whole, read its weights, quantize its projections
    to NF4; FSDP then shards the NF4 tensors. The adapters are initialized later."""
    from fastune.modules.peft import quantize_base_weights

    layer.to_empty(device=device)
    load_hf_weights(layer, checkpoint_dir, prefix, whole=True)
    quantize_base_weights(layer)
    for name, param in layer.named_parameters():
        if _is_nf4(param):
            _check_nf4_shardable(param, prefix + name, world_size)


def _check_nf4_shardable(weight: torch.Tensor, name: str, world_size: int) -> None:
    """FSDP splits an NF4 weight's packed data, block scales and scale factors along rows
    (torchao asserts on an uneven split): each must divide evenly over the ranks."""
    from fastune.modules.lora import NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE, LoRAError

    group = NF4_BLOCK_SIZE * NF4_SCALER_BLOCK_SIZE * world_size
    if weight.numel() % group or weight.shape[0] % world_size:
        raise LoRAError(f"QLoRA on {world_size} ranks: {name} {tuple(weight.shape)} cannot be sharded as NF4; "
                        f"it needs rows divisible by {world_size} and a multiple of {group} elements")


def _is_nf4(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "NF4Tensor"  # no torchao import for the check
